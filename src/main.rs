fn main() {
    std::process::exit(qssh::cli::run(std::env::args_os()));
}
