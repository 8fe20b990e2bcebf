//! The seed usage: `p2p_demo listen`, `p2p_demo connect <addr>`, `p2p_demo discover`.
//! A thin wrapper: it drives exactly the same command line as the `qssh` binary.

fn main() {
    std::process::exit(qssh::cli::run(std::env::args_os()));
}
