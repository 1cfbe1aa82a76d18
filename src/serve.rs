//! `dkron-ha serve`: the HTTPS admission webhook (:8443) and the plain-HTTP port (:8081) with
//! health, readiness and metrics. Admission never depends on the Kubernetes API being
//! reachable: a webhook that cannot start when the API is down would block its own recovery.

use crate::admission::{self, BadReview};
use crate::inject::InjectorConfig;
use crate::metrics::{self, AdmissionMetrics, ReviewOperation, ReviewResult};
use crate::tls::{self, ReloadingCert};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use prometheus_client::registry::Registry;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutLayer;

/// An AdmissionReview carries the object twice (object and oldObject); objects are at most
/// 1.5 MiB in etcd, so 8 MiB fits every real review and bounds what a client can make us buffer.
pub const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;
/// The API server's webhook timeout is at most 30 s; we answer well inside any setting.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// Injector flags shared by `serve` and `inject`.
#[derive(Clone, Debug, clap::Args)]
pub struct InjectorArgs {
    /// Image of the injected install container and label-updater sidecar.
    #[arg(long, env = "DKRON_HA_INJECT_IMAGE", default_value_t = InjectorConfig::default().image)]
    pub inject_image: String,
    /// Kubernetes cluster DNS domain used in peer names.
    #[arg(long, env = "DKRON_HA_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Inject the label-updater as a native sidecar (init container with restartPolicy Always, Kubernetes 1.29+).
    #[arg(long, env = "DKRON_HA_NATIVE_SIDECAR", default_value_t = false)]
    pub native_sidecar: bool,
}

impl InjectorArgs {
    pub fn config(&self) -> InjectorConfig {
        InjectorConfig {
            image: self.inject_image.clone(),
            cluster_domain: self.cluster_domain.clone(),
            native_sidecar: self.native_sidecar,
            version: crate::VERSION.to_string(),
        }
    }
}

/// Flags of `dkron-ha serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of the HTTPS admission webhook.
    #[arg(long, env = "DKRON_HA_HTTPS_ADDR", default_value = "0.0.0.0:8443")]
    pub https_addr: SocketAddr,
    /// Address of the plain-HTTP port (FleetLock, metrics, health).
    #[arg(long, env = "DKRON_HA_HTTP_ADDR", default_value = "0.0.0.0:8081")]
    pub http_addr: SocketAddr,
    /// PEM certificate chain of the webhook; re-read when it changes.
    #[arg(
        long,
        env = "DKRON_HA_TLS_CERT",
        default_value = "/etc/dkron-ha/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key of the webhook; re-read when it changes.
    #[arg(
        long,
        env = "DKRON_HA_TLS_KEY",
        default_value = "/etc/dkron-ha/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for rotation, in seconds.
    #[arg(long, env = "DKRON_HA_TLS_RELOAD_SECONDS", default_value_t = 2)]
    pub tls_reload_seconds: u64,
    #[command(flatten)]
    pub injector: InjectorArgs,
}

/// State of the admission router.
#[derive(Clone)]
pub struct AdmissionState {
    pub injector: Arc<InjectorConfig>,
    pub metrics: AdmissionMetrics,
}

/// `POST /mutate` and `GET /healthz`, as served on the HTTPS port.
pub fn admission_router(state: AdmissionState) -> Router {
    admission_limits(
        Router::new()
            .route("/mutate", post(mutate))
            .route("/healthz", get(|| async { "ok" })),
    )
    .with_state(state)
}

/// The limits every admission request gets: the body size and the time to answer.
pub fn admission_limits<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

async fn mutate(State(state): State<AdmissionState>, body: Bytes) -> Response {
    let started = Instant::now();
    match admission::review(&body, &state.injector) {
        Ok(answer) => {
            state.metrics.observe(
                (&answer.operation).into(),
                answer.verdict.into(),
                started.elapsed(),
            );
            ([(header::CONTENT_TYPE, "application/json")], answer.body).into_response()
        }
        Err(error) => {
            tracing::warn!(%error, bytes = body.len(), "malformed admission review");
            state.metrics.observe(
                ReviewOperation::Unknown,
                ReviewResult::Malformed,
                started.elapsed(),
            );
            (StatusCode::BAD_REQUEST, axum::Json(BadReview::from(&error))).into_response()
        }
    }
}

/// State of the plain-HTTP router.
#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
}

/// `/healthz`, `/readyz` and `/metrics`; FleetLock routes are merged in with [`Server::merge_http`].
pub fn http_router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "webhook not listening yet").into_response()
    }
}

async fn metrics_handler(State(state): State<HttpState>) -> Response {
    match metrics::encode(&state.registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes (axum-server: bounded
/// handshake, HTTP/1.1 keep-alive and HTTP/2 by ALPN, accept errors backed off). At shutdown,
/// open connections (the API server keeps them alive between reviews) finish their in-flight
/// request and close, for at most [`REQUEST_TIMEOUT`], so a stopped webhook really stops.
pub async fn serve_https(
    listener: TcpListener,
    tls_config: rustls::ServerConfig,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // The config's resolver is `tls::ReloadingCert`, which follows the files itself.
    let tls = RustlsConfig::from_config(Arc::new(tls_config));
    let acceptor = RustlsAcceptor::new(tls)
        .handshake_timeout(TLS_HANDSHAKE_TIMEOUT)
        .acceptor(NoDelayAcceptor::new());
    let handle = axum_server::Handle::<SocketAddr>::new();
    let serving = axum_server::Server::from_listener(listener)
        .acceptor(acceptor)
        .handle(handle.clone())
        .accept_error_handler(|peer, error| match peer {
            Some(peer) => tracing::debug!(%peer, %error, "TLS connection not accepted"),
            None => tracing::warn!(%error, "accept failed"),
        })
        .serve(router.into_make_service());
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result.map_err(ServeError::Io),
        () = shutdown => handle.graceful_shutdown(Some(REQUEST_TIMEOUT)),
    }
    serving.await.map_err(ServeError::Io)
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = terminate => {},
    }
}

/// A background role started by [`Server::run`] (the controller); its token is cancelled at
/// shutdown.
pub type BackgroundTask =
    Box<dyn FnOnce(CancellationToken) -> futures::future::BoxFuture<'static, ()> + Send>;

/// Everything `serve` runs, bound and ready; [`Server::run`] drives it.
pub struct Server {
    https: TcpListener,
    http: TcpListener,
    tls_config: rustls::ServerConfig,
    admission: Router,
    registry: Registry,
    extra_http: Router,
    tasks: Vec<BackgroundTask>,
    ready_gates: Vec<futures::future::BoxFuture<'static, ()>>,
    ready: Arc<AtomicBool>,
}

impl Server {
    /// Loads the certificate, registers metrics and binds both ports. Touches no Kubernetes
    /// API: admission works even when the API server is unreachable.
    pub async fn bind(args: &ServeArgs) -> Result<Self, ServeError> {
        let cert = Arc::new(ReloadingCert::new(&args.tls_cert, &args.tls_key)?);
        cert.clone()
            .watch(Duration::from_secs(args.tls_reload_seconds.max(1)));
        let tls_config = tls::server_config(cert)?;

        let mut registry = Registry::default();
        let admission_metrics = AdmissionMetrics::register(&mut registry);
        let admission = admission_router(AdmissionState {
            injector: Arc::new(args.injector.config()),
            metrics: admission_metrics,
        });

        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })
        };
        Ok(Self {
            https: bind(args.https_addr).await?,
            http: bind(args.http_addr).await?,
            tls_config,
            admission,
            registry,
            extra_http: Router::new(),
            tasks: Vec::new(),
            ready_gates: Vec::new(),
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn https_addr(&self) -> std::io::Result<SocketAddr> {
        self.https.local_addr()
    }

    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// Where other roles register their metrics before [`Server::run`].
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Adds routes to the plain-HTTP port (FleetLock).
    pub fn merge_http(&mut self, router: Router) {
        self.extra_http = std::mem::take(&mut self.extra_http).merge(router);
    }

    /// `/readyz` answers 200 only once `gate` has completed (e.g. FleetLock's first lists), so
    /// the Service sends no request that could only wait.
    pub fn ready_after(&mut self, gate: futures::future::BoxFuture<'static, ()>) {
        self.ready_gates.push(gate);
    }

    /// Adds a background role, started by [`Server::run`] and stopped at shutdown.
    pub fn add_task(&mut self, task: BackgroundTask) {
        self.tasks.push(task);
    }

    /// Serves until `shutdown` completes, then stops both ports and every background role.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let stop = CancellationToken::new();
        tracing::info!(
            https = %self.https.local_addr()?,
            http = %self.http.local_addr()?,
            "serving admission webhook, health and metrics"
        );
        let http_router = http_router(HttpState {
            registry: Arc::new(self.registry),
            ready: self.ready.clone(),
        })
        .merge(self.extra_http);
        let background = TaskTracker::new();
        for task in self.tasks {
            background.spawn(task(stop.child_token()));
        }
        background.close();
        let ready = self.ready.clone();
        let gates = futures::future::join_all(self.ready_gates);
        let gated = tokio::spawn(async move {
            gates.await;
            ready.store(true, Ordering::Relaxed);
            tracing::info!("ready");
        });
        let https = tokio::spawn(serve_https(
            self.https,
            self.tls_config,
            self.admission,
            stop.clone().cancelled_owned(),
        ));
        let http = tokio::spawn(
            axum::serve(self.http, http_router)
                .with_graceful_shutdown(stop.clone().cancelled_owned())
                .into_future(),
        );
        shutdown.await;
        tracing::info!("shutting down");
        gated.abort();
        self.ready.store(false, Ordering::Relaxed);
        stop.cancel();
        // Background roles get a bounded time to hand over (e.g. release the Lease).
        if tokio::time::timeout(Duration::from_secs(10), background.wait())
            .await
            .is_err()
        {
            tracing::warn!("background roles did not stop within 10 s");
        }
        let (https, http) = tokio::join!(https, http);
        https.map_err(std::io::Error::other)??;
        http.map_err(std::io::Error::other)??;
        Ok(())
    }
}
