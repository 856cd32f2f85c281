//! airlock-fastpath: the gRPC relay's compiled data path (docs/FASTPATH.md).
//!
//!   airlock-fastpath edge --tunnel-listen 0.0.0.0:8450   # on the control plane, driven by the gateway
//!   airlock-fastpath agent                               # in the appliance, driven by the agent
//!
//! Both are driven over stdin/stdout by their Python owner (control.rs) and end when it does.

mod agent;
mod control;
mod edge;
mod grpc;
mod h2call;
mod noise;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: airlock-fastpath edge --tunnel-listen HOST:PORT | airlock-fastpath agent");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let outcome = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["edge", "--tunnel-listen", address] => runtime.block_on(edge::run(address)),
        ["agent"] => runtime.block_on(agent::run()),
        _ => return usage(),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("airlock-fastpath: {err}");
            ExitCode::FAILURE
        }
    }
}
