//! The `dkron-ha` binary: parses the command line and dispatches to the library.
#![forbid(unsafe_code)]

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use dkron_ha::{certs, controller, fleetlock, manifests, serve, telemetry};
use std::io::Read;
use std::path::PathBuf;

// Admission is allocation-heavy (Kubernetes objects parsed and serialized per request);
// mimalloc is measurably faster than the system allocator there (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "dkron-ha", version = dkron_ha::VERSION, about = "Makes a Dkron StatefulSet highly available on Kubernetes")]
struct Cli {
    /// Log format: text for people, json for log pipelines.
    #[arg(
        long,
        global = true,
        env = "DKRON_HA_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: telemetry::LogFormat,
    /// Log filter in RUST_LOG syntax, e.g. `info` or `info,dkron_ha=debug`.
    #[arg(
        long,
        global = true,
        env = "DKRON_HA_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the admission webhook (HTTPS), the health/metrics port (HTTP) and the controller.
    Serve {
        #[command(flatten)]
        serve: Box<serve::ServeArgs>,
        #[command(flatten)]
        controller: controller::ControllerArgs,
        #[command(flatten)]
        fleetlock: fleetlock::FleetLockConfig,
    },
    /// Print manifests with every opted-in StatefulSet and every Deployment or StatefulSet of
    /// workers injected, as the webhook would on CREATE.
    Inject {
        /// YAML file with one or more documents, or `-` for standard input.
        #[arg(short = 'f', long = "filename", env = "DKRON_HA_FILENAME")]
        file: String,
        #[command(flatten)]
        injector: serve::InjectorArgs,
    },
    /// Copy this executable into DIR (the init container of each Dkron pod).
    Install {
        /// Target directory, normally the shared emptyDir /dkron-ha/bin.
        dir: PathBuf,
    },
    /// Start Dkron with this pod's cluster flags and supervise it (entrypoint of the Dkron container).
    Wrap {
        /// The Dkron command, e.g. `-- /usr/local/bin/dkron agent --server`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Keep the pod label `dkron-ha/leader` equal to Dkron's leadership (sidecar).
    LabelUpdater(dkron_ha::runtime::label_updater::LabelUpdaterArgs),
    /// Certificate tooling.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// FleetLock tooling.
    Fleetlock {
        #[command(subcommand)]
        command: FleetlockCommand,
    },
    /// Print version and git commit.
    Version,
}

#[derive(Subcommand)]
enum FleetlockCommand {
    /// Print the id Zincati sends for a machine (its /etc/machine-id, 32 hex digits).
    NodeId {
        #[arg(long, env = "DKRON_HA_MACHINE_ID")]
        machine_id: String,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Generate a CA and a serving certificate for the webhook Service.
    Generate {
        /// Name of the webhook Service (a DNS-1123 label, e.g. dkron-ha).
        #[arg(long, env = "DKRON_HA_SERVICE", value_parser = dns_label)]
        service: String,
        /// Namespace of the webhook Service (a DNS-1123 label).
        #[arg(long, env = "DKRON_HA_NAMESPACE", value_parser = dns_label)]
        namespace: String,
        /// Directory for ca.crt, ca.key, tls.crt and tls.key; none of them may exist yet
        /// unless --force.
        #[arg(long, env = "DKRON_HA_OUT")]
        out: PathBuf,
        /// Extra DNS names or IP addresses for the serving certificate (repeatable).
        #[arg(
            long = "extra-name",
            env = "DKRON_HA_EXTRA_NAME",
            value_delimiter = ','
        )]
        extra_names: Vec<String>,
        /// Validity of the serving certificate in days (the CA gets ten times as long).
        #[arg(long, env = "DKRON_HA_DAYS", default_value_t = 365)]
        days: u32,
        /// Replace ca.crt, ca.key, tls.crt and tls.key if they exist in --out.
        #[arg(long, env = "DKRON_HA_FORCE")]
        force: bool,
    },
}

/// `--service`/`--namespace`: Kubernetes names them with DNS-1123 labels.
fn dns_label(value: &str) -> Result<String, String> {
    if dkron_ha::names::is_dns_label(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("must be {}", dkron_ha::names::DNS_LABEL_RULE))
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain on one line; no backtrace for a user's mistake.
            eprintln!("error: {}", causes_once(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once. kube's errors, like ours, put their
/// cause in their own message (so a log line's `%error` says it) and return it from
/// `source()` as well: anyhow's `{:#}` then repeats every cause, so a cause already written
/// is skipped.
fn causes_once(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init(cli.log_format, &cli.log_level).map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Serve {
            serve,
            controller,
            fleetlock,
        } => run_serve(*serve, controller, fleetlock),
        Command::Inject { file, injector } => run_inject(&file, &injector),
        Command::Install { dir } => {
            let target = dkron_ha::install::install_self(&dir)?;
            tracing::info!(target = %target.display(), "installed");
            Ok(())
        }
        Command::Wrap { command } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let code = runtime.block_on(dkron_ha::runtime::wrap::run(command))?;
            // Exit at once: dropping the runtime would wait for a DNS look-up still blocked.
            std::process::exit(code)
        }
        Command::LabelUpdater(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(dkron_ha::runtime::label_updater::run(args))?;
            Ok(())
        }
        Command::Certs {
            command:
                CertsCommand::Generate {
                    service,
                    namespace,
                    out,
                    extra_names,
                    days,
                    force,
                },
        } => {
            let generated = certs::generate(&certs::CertRequest {
                service,
                namespace,
                extra_names,
                valid_days: days,
            })?;
            let written = if force {
                generated.overwrite_in(&out)?
            } else {
                generated.write_to(&out)?
            };
            for path in written {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Fleetlock {
            command: FleetlockCommand::NodeId { machine_id },
        } => {
            println!("{}", fleetlock::app_specific_machine_id(&machine_id)?);
            Ok(())
        }
        Command::Version => {
            println!(
                "dkron-ha {} (commit {})",
                dkron_ha::VERSION,
                dkron_ha::GIT_COMMIT
            );
            Ok(())
        }
    }
}

fn run_serve(
    args: serve::ServeArgs,
    controller_args: controller::ControllerArgs,
    fleetlock_config: fleetlock::FleetLockConfig,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut server = serve::Server::bind(&args).await?;
        // Cancelled first when shutdown begins: FleetLock's waiting requests answer at once.
        let stopping = tokio_util::sync::CancellationToken::new();
        // Building a client reads configuration only; it never waits for the API server.
        match kube::Config::infer().await {
            Ok(config) => {
                let client = kube::Client::try_from(config.clone())?;
                // Evictions must see a PDB's 429 at once, not after the client's retries.
                let mut eviction_config = config;
                eviction_config.default_retry = false;
                let eviction_client = kube::Client::try_from(eviction_config)?;
                let fleetlock =
                    fleetlock::FleetLock::new(client.clone(), fleetlock_config, server.registry_mut())
                        .with_eviction_client(eviction_client)
                        .with_shutdown(stopping.clone());
                let fleetlock = std::sync::Arc::new(fleetlock);
                let gate = fleetlock.clone();
                server.ready_after(Box::pin(async move { gate.until_ready().await }));
                server.merge_http(fleetlock::router(fleetlock));
                if controller_args.enabled {
                    let metrics = controller::ControllerMetrics::register(server.registry_mut());
                    server.add_task(Box::new(move |stop| {
                        Box::pin(async move {
                            let (leading, _) = tokio::sync::watch::channel(false);
                            if let Err(error) =
                                controller::run(client, controller_args, metrics, leading, stop.cancelled_owned()).await
                            {
                                tracing::error!(%error, "controller stopped");
                            }
                        })
                    }));
                }
            }
            Err(error) => tracing::warn!(
                %error,
                "no Kubernetes client configuration: serving admission only (controller and FleetLock off)"
            ),
        }
        server
            .run(async move {
                serve::shutdown_signal().await;
                stopping.cancel();
            })
            .await?;
        Ok(())
    })
}

fn run_inject(file: &str, injector: &serve::InjectorArgs) -> anyhow::Result<()> {
    let input = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read standard input")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
    };
    let result = manifests::inject_manifests(&input, &injector.config())?;
    for warning in &result.warnings {
        eprintln!("warning: {warning}");
    }
    if result.injected == 0 && !input.contains(dkron_ha::names::ANNOTATION_ENABLED) {
        eprintln!(
            "note: no StatefulSet carries {}: \"true\"; nothing was injected",
            dkron_ha::names::ANNOTATION_ENABLED
        );
    }
    print!("{}", result.yaml);
    if result.yaml.is_empty() && input.trim().is_empty() {
        bail!("the input is empty");
    }
    Ok(())
}
