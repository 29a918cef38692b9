//! The `handler` binary: see [`handler::cli`].

use std::process::ExitCode;

use clap::Parser;

use handler::cli::{self, Cli};
use handler::settings::Settings;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(cli::run(cli, settings));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
