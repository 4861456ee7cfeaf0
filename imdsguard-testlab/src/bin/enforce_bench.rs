fn main() {
    imdsguard_testlab::probe::run_if_probe();
    eprintln!("not implemented yet");
    std::process::exit(1);
}
