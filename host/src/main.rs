//! `vhost-plug`: vhost-user virtio-vsock backend daemon.

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use vhost_plug::config::{
    self, Command, CtlCommand, Invocation, LogFormat, PluginCommand, StateCommand,
};
use vhost_plug::control::{self, Request};

fn main() -> ExitCode {
    let cfg = match config::parse_invocation_from(std::env::args_os()) {
        Ok(Invocation::Daemon(cfg)) => cfg,
        Ok(Invocation::Command(cmd)) => return run_command(cmd),
        // clap's own help and version output also arrive here.
        Err(e) => return e.exit(),
    };
    let filter = match &cfg.log_level {
        Some(directives) => EnvFilter::new(directives),
        None => EnvFilter::try_from_env("VHOST_PLUG_LOG")
            .or_else(|_| EnvFilter::try_from_default_env())
            .unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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

fn run_command(cmd: Command) -> ExitCode {
    match cmd {
        Command::Ctl { socket, command } => {
            let req = match command {
                CtlCommand::Status => Request::Status,
                CtlCommand::Plugins => Request::Plugins,
                CtlCommand::Swap { spec, replace, vm } => Request::Swap { spec, replace, vm },
                CtlCommand::Save { file, vm } => Request::Save {
                    file: std::path::absolute(&file).unwrap_or(file),
                    vm,
                },
                CtlCommand::Load { file, vm } => Request::Load {
                    file: std::path::absolute(&file).unwrap_or(file),
                    vm,
                },
                // The daemon resolves the path from its own working directory.
                CtlCommand::Handover { to, vm } => Request::Handover {
                    to: std::path::absolute(&to).unwrap_or(to),
                    vm,
                },
                CtlCommand::Conns { vm } => Request::Conns { vm },
                CtlCommand::Upgrade { binary } => Request::Upgrade {
                    binary: binary.map(|b| std::path::absolute(&b).unwrap_or(b)),
                },
            };
            match control::request(&socket, &req) {
                Ok(answer) => {
                    let ok = answer.get("ok").and_then(|v| v.as_bool()) == Some(true);
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&answer).unwrap_or_default()
                    );
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("{}: {e}", socket.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::State(StateCommand::Inspect { file, serializer }) => {
            match vhost_plug::inspect::inspect_file(&file, serializer.as_deref()) {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Plugin(PluginCommand::New { name, world, dir }) => {
            let parent = dir.unwrap_or_else(|| ".".into());
            match vhost_plug::scaffold::new_plugin(&name, world, &parent) {
                Ok(root) => {
                    let wasm = vhost_plug::scaffold::wasm_file_name(&name);
                    println!("created {world} plugin crate {}", root.display());
                    println!("  cd {}", root.display());
                    println!("  cargo build --release --target wasm32-wasip2");
                    println!("  vhost-plug plugin check target/wasm32-wasip2/release/{wasm}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Plugin(PluginCommand::Check { file }) => {
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            match vhost_plug::plugin::check(&bytes) {
                Ok(info) => {
                    println!(
                        "{}: {} plugin (world {})",
                        file.display(),
                        info.kind,
                        info.world
                    );
                    println!("  size: {} bytes, sha256: {}", info.size, info.sha256);
                    println!("  exports: {}", info.exports.join(", "));
                    println!("  imports: {}", info.imports.join(", "));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
