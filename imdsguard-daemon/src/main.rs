use anyhow::Context as _;
use imdsguard::{
    cli::{
        self,
        args::{Cli, Command},
    },
    node, standalone, telemetry,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_args();
    telemetry::init(cli.log_format, &cli.log_level).context("invalid --log-level")?;
    match cli.command {
        Command::Run(args) => standalone::run(args).await?,
        Command::Node(args) => node::agent::run(args).await?,
        Command::Status(args) => print!("{}", cli::status::run(&args).await?),
        Command::Explain(args) => print!("{}", cli::explain::run(&args).await?),
        Command::Report(args) => print!("{}", cli::report::run(&args).await?),
        Command::Uninstall(args) => print!("{}", cli::uninstall::run(&args)?),
        Command::Destinations => print!("{}", cli::destinations::render()),
        Command::Profiles => print!("{}", cli::profiles::render()?),
        Command::Presets(args) => print!("{}", cli::presets::render(args.output)?),
    }
    Ok(())
}
