//! `vhost-plug`: vhost-user virtio-vsock backend daemon.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use vhost_plug::config::{self, LogFormat};

fn main() -> ExitCode {
    let cfg = match config::parse_from(std::env::args_os()) {
        Ok(cfg) => cfg,
        Err(e) => {
            // clap's own help and version output also arrive here.
            return e.exit();
        }
    };
    let filter = EnvFilter::try_from_env("VHOST_PLUG_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    match vhost_plug::daemon::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
