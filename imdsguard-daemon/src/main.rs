use anyhow::Context as _;
use clap::Parser as _;
use imdsguard::{
    bpf::enforcer,
    bpf::pins::PinLayout,
    cgroup::mount::CgroupDir,
    cli::args::{Cli, Command, Output},
    cli::explain,
    cli::status,
    destinations, standalone, telemetry,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, &cli.log_level).context("invalid --log-level")?;
    match cli.command {
        Command::Run(args) => standalone::run(args).await?,
        Command::Node(args) => imdsguard::node::agent::run(args).await?,
        Command::Status(args) => {
            let mut s = status::read(&PinLayout::new(&args.pin_dir))?;
            if let Some(p) = &args.policy {
                status::with_policy(&mut s, p)?;
            }
            if args.kubernetes {
                status::with_pod_names(&mut s).await?;
            }
            match args.output {
                Output::Table => print!("{}", status::render(&s)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
            }
        }
        Command::Explain(args) => {
            let pins = PinLayout::new(&args.pin_dir);
            let e = match (&args.pod, &args.cgroup) {
                (Some(pod), _) => {
                    explain::for_pod(
                        &pins,
                        pod,
                        args.policy.as_deref(),
                        args.kubepods_root.as_deref(),
                    )
                    .await?
                }
                (None, Some(cg)) => explain::for_cgroup(&pins, &CgroupDir::open(cg)?)?,
                (None, None) => unreachable!("clap requires --pod or --cgroup"),
            };
            match args.output {
                Output::Table => print!("{}", explain::render(&e)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
            }
        }
        Command::Uninstall(args) => {
            let report = enforcer::uninstall(&PinLayout::new(&args.pin_dir))?;
            if report.links.is_empty() && report.maps.is_empty() {
                println!("no imdsguard installation at {}", args.pin_dir.display());
            } else {
                println!(
                    "detached {} and removed {} pinned maps from {}",
                    if report.links.is_empty() {
                        "nothing".to_string()
                    } else {
                        report.links.join(", ")
                    },
                    report.maps.len(),
                    args.pin_dir.display()
                );
            }
        }
        Command::Destinations => {
            for d in destinations::defaults() {
                let ranges: Vec<String> = d
                    .effective_ranges()
                    .iter()
                    .map(|(a, b)| format!("{a}-{b}"))
                    .collect();
                println!(
                    "{:<24} {:<26} ports {}",
                    d.prefix.to_string(),
                    d.name,
                    ranges.join(",")
                );
            }
        }
    }
    Ok(())
}
