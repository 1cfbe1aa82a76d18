//! Who the peers of this pod are, from the environment the injector sets.

use crate::names::{
    ENV_CLUSTER_DOMAIN, ENV_INITIAL_CLUSTER_SIZE, ENV_LEADER_SERVICE, ENV_POD_IP, ENV_POD_NAME,
    ENV_POD_NAMESPACE, ENV_SERVICE, ENV_STATEFULSET,
};
use std::time::Duration;

/// Default bound of the wait for DNS names (`DKRON_HA_DNS_TIMEOUT_SECONDS`).
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(120);
/// Default time a cold start has to form a leader before the server that bootstraps it restarts
/// its Dkron (`DKRON_HA_COLD_START_TIMEOUT_SECONDS`). A cold start of 3 forms one in 5–9 s.
pub const DEFAULT_COLD_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error(
        "environment variable {0} is not set; the dkron-ha injector sets it on the Dkron container (was the pod created before the webhook was installed?)"
    )]
    Missing(&'static str),
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// The identity of this pod and of its StatefulSet, as read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub statefulset: String,
    pub service: String,
    pub namespace: String,
    pub cluster_domain: String,
    pub initial_cluster_size: u32,
    pub pod_name: String,
    pub pod_ip: std::net::IpAddr,
    pub dns_timeout: Duration,
    pub cold_start_timeout: Duration,
    /// How long Dkron's start waits while a peer holds this server's name alive at another
    /// address (`DKRON_HA_NAME_WAIT_SECONDS`, [`super::membership::NAME_CONFLICT_WAIT`]).
    pub name_wait: Duration,
    /// The `<sts>-leader` Service (`DKRON_HA_LEADER_SERVICE`): the leader's pod, whichever
    /// ordinal leads; asked for a leader beside the initial peers.
    pub leader_service: Option<String>,
}

impl ClusterSettings {
    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup` (pure given `lookup`; tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let required = |name: &'static str| {
            lookup(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.trim().to_owned())
                .ok_or(SettingsError::Missing(name))
        };
        let size_raw = required(ENV_INITIAL_CLUSTER_SIZE)?;
        let initial_cluster_size = match size_raw.parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err(SettingsError::Invalid {
                    name: ENV_INITIAL_CLUSTER_SIZE,
                    value: size_raw,
                    reason: "expected a whole number of servers, at least 1",
                });
            }
        };
        let ip_raw = required(ENV_POD_IP)?;
        let pod_ip = ip_raw.parse().map_err(|_| SettingsError::Invalid {
            name: ENV_POD_IP,
            value: ip_raw.clone(),
            reason: "expected an IP address (fieldRef status.podIP)",
        })?;
        let seconds = |name: &'static str, default: Duration| match lookup(name)
            .filter(|v| !v.trim().is_empty())
        {
            None => Ok(default),
            Some(raw) => match raw.trim().parse::<u64>() {
                Ok(n) if n >= 1 => Ok(Duration::from_secs(n)),
                _ => Err(SettingsError::Invalid {
                    name,
                    value: raw.clone(),
                    reason: "expected a whole number of seconds, at least 1",
                }),
            },
        };
        let dns_timeout = seconds("DKRON_HA_DNS_TIMEOUT_SECONDS", DEFAULT_DNS_TIMEOUT)?;
        let cold_start_timeout = seconds(
            "DKRON_HA_COLD_START_TIMEOUT_SECONDS",
            DEFAULT_COLD_START_TIMEOUT,
        )?;
        let name_wait = seconds(
            "DKRON_HA_NAME_WAIT_SECONDS",
            super::membership::NAME_CONFLICT_WAIT,
        )?;
        let cluster_domain = lookup(ENV_CLUSTER_DOMAIN)
            .map(|d| d.trim().trim_end_matches('.').to_owned())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "cluster.local".to_owned());
        Ok(Self {
            statefulset: required(ENV_STATEFULSET)?,
            service: required(ENV_SERVICE)?,
            namespace: required(ENV_POD_NAMESPACE)?,
            cluster_domain,
            initial_cluster_size,
            pod_name: required(ENV_POD_NAME)?,
            pod_ip,
            dns_timeout,
            cold_start_timeout,
            name_wait,
            leader_service: lookup(ENV_LEADER_SERVICE)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty()),
        })
    }

    /// The stable DNS name of the pod with this ordinal (headless Service record).
    pub fn peer_fqdn(&self, ordinal: u32) -> String {
        format!(
            "{}-{ordinal}.{}.{}.svc.{}",
            self.statefulset, self.service, self.namespace, self.cluster_domain
        )
    }

    /// All initial peers, ordinals 0..initial-cluster-size, this pod included.
    pub fn peer_fqdns(&self) -> Vec<String> {
        (0..self.initial_cluster_size)
            .map(|i| self.peer_fqdn(i))
            .collect()
    }

    /// This pod's own DNS name.
    pub fn own_fqdn(&self) -> String {
        format!(
            "{}.{}.{}.svc.{}",
            self.pod_name, self.service, self.namespace, self.cluster_domain
        )
    }

    /// Where to ask whether a leader exists: the initial peers other than this pod, and the
    /// leader Service (it reaches a leader of any ordinal, e.g. after a scale-up).
    pub fn leader_sources(&self) -> Vec<String> {
        let mut sources = self.other_peers();
        sources.extend(self.leader_service.as_ref().map(|service| {
            if service.contains('.') {
                service.clone()
            } else {
                format!("{service}.{}.svc.{}", self.namespace, self.cluster_domain)
            }
        }));
        sources
    }

    /// The initial peers other than this pod.
    pub fn other_peers(&self) -> Vec<String> {
        let own = self.own_fqdn();
        self.peer_fqdns()
            .into_iter()
            .filter(|p| *p != own)
            .collect()
    }
}

/// What a worker agent's `wrap` reads (`DKRON_HA_AGENT_OF` set): the servers it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// The server StatefulSet.
    pub servers: String,
    /// The servers' headless Service.
    pub service: String,
    pub namespace: String,
    pub cluster_domain: String,
    pub pod_name: String,
}

impl AgentSettings {
    /// `None` unless this is a worker (`DKRON_HA_AGENT_OF`); pure given `lookup`.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, SettingsError> {
        let value = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let Some(servers) = value(crate::names::ENV_AGENT_OF) else {
            return Ok(None);
        };
        let required = |name: &'static str| value(name).ok_or(SettingsError::Missing(name));
        Ok(Some(Self {
            servers,
            service: required(ENV_SERVICE)?,
            namespace: required(ENV_POD_NAMESPACE)?,
            cluster_domain: value(ENV_CLUSTER_DOMAIN)
                .map(|d| d.trim_end_matches('.').to_owned())
                .unwrap_or_else(|| "cluster.local".to_owned()),
            pod_name: required(ENV_POD_NAME)?,
        }))
    }

    /// The servers' headless Service name: it resolves to every server pod's IP (ready or not,
    /// with `publishNotReadyAddresses`), and serf's join reaches each address a name resolves to.
    pub fn servers_fqdn(&self) -> String {
        format!(
            "{}.{}.svc.{}",
            self.service, self.namespace, self.cluster_domain
        )
    }
}
