//! The command line as clap parses it. Each command's behaviour is in `commands/`; what
//! is shared by every command (where the API is, who calls it, how output looks) is
//! [`Global`].

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "chainrun",
    version,
    about = "Start chainrun workflow runs, follow them live, steer and inspect them",
    after_help = "Exit status: 0 the run completed (or the command succeeded), 1 the run failed or was cancelled, \
                  2 bad usage or the API refused or could not be reached, 3 the run waits for input."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the API is and who calls it; how output looks.
#[derive(Debug, Args)]
pub struct Global {
    /// The API's base URL. Default: API_URL of the local stack's env file.
    #[arg(long, env = "API_URL", global = true, value_name = "URL")]
    pub api_url: Option<String>,
    /// A bearer token (a JWT of your identity provider, or `make token`).
    #[arg(long, env = "CHAINRUN_TOKEN", global = true, hide_env_values = true, value_name = "JWT")]
    pub token: Option<String>,
    /// A shell command that prints a bearer token (run when no --token is given).
    #[arg(long, env = "CHAINRUN_TOKEN_COMMAND", global = true, value_name = "COMMAND")]
    pub token_command: Option<String>,
    /// The local stack's env file. Default: STACK_ENV_FILE, else `.local/stack.env` in this
    /// directory or the nearest parent that has one.
    #[arg(long, env = "CHAINRUN_ENV_FILE", global = true, value_name = "PATH")]
    pub env_file: Option<PathBuf>,
    /// Who a token minted for the local stack names. Default: $USER, else `dev`.
    #[arg(long, env = "CHAINRUN_USER", global = true)]
    pub user: Option<String>,
    /// Groups of a token minted for the local stack, comma-separated.
    #[arg(long, env = "CHAINRUN_GROUPS", global = true, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Machine output only: the API's JSON on stdout, nothing else.
    #[arg(long, global = true)]
    pub json: bool,
    /// Plain lines only: no spinners, bars or colours (as when output is not a terminal).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a run and follow it live until it ends or waits for input.
    Run(RunArgs),
    /// Follow a run live (from its first event) until it ends or waits for input.
    Watch { run: String },
    /// A run's steps, totals and output.
    Show(ShowArgs),
    /// Runs you started, or the runs of one workflow, newest first.
    Runs(RunsArgs),
    /// What a workflow may cost on an input, before running it.
    Estimate(EstimateArgs),
    /// Costs, latencies and failure rates per workflow and step over the last days.
    Costs {
        /// UTC days, today included (1–90).
        #[arg(long, default_value_t = 7)]
        days: u32,
        /// Whose runs: me, group:<name>, admin, authed or public.
        #[arg(long)]
        scope: Option<String>,
    },
    /// What you have spent today against your daily cap.
    Spend,
    /// Continue a waiting run: resume a pause, decide a review, answer an input step or
    /// raise a budget.
    Resume(ResumeArgs),
    /// Cancel a run: running steps stop, nothing new starts.
    Cancel {
        run: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Pause a run: steps in flight finish, nothing new starts until a resume.
    Pause {
        run: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Run one step of an ended run again, and what depends on it, as a new revision.
    Retry(RetryArgs),
    /// Set one step's output of an ended run by hand; what depends on it runs again.
    Override(OverrideArgs),
    /// Stored workflows.
    #[command(subcommand)]
    Workflows(WorkflowsCommand),
    /// Built-in and saved workflow templates: the list, or one with its definition.
    Templates {
        /// A template's id: show it with its definition and example input.
        id: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
}

/// What a run (or an estimate) is of: a file, or a stored workflow, and its input.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// A workflow definition, or a request body `{"workflow": …, "input": …, "options": …}`.
    #[arg(required_unless_present = "workflow", conflicts_with = "workflow")]
    pub file: Option<PathBuf>,
    /// The input: JSON, or @FILE (@- for stdin). Default: the file's `input`, else {}.
    #[arg(long, value_name = "JSON|@FILE")]
    pub input: Option<String>,
    /// A stored workflow's id, instead of a file.
    #[arg(long, value_name = "ID")]
    pub workflow: Option<String>,
    /// The stored workflow's version (default: its latest).
    #[arg(long, requires = "workflow")]
    pub version: Option<u32>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Approve every review step of the run at once.
    #[arg(long)]
    pub auto_approve: bool,
    /// Start the run and print its id without following it.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub run: String,
    /// Show revision N as it ended (default: the latest).
    #[arg(long)]
    pub revision: Option<u32>,
    /// Print the run's step graph, with statuses and timings, as a Mermaid flowchart.
    #[arg(long, conflicts_with = "open")]
    pub mermaid: bool,
    /// Print the URL of the run's view page.
    #[arg(long)]
    pub open: bool,
    /// With --open: put your token in the URL's fragment, so the page needs no login.
    /// Anyone with the URL can then act as you until the token expires.
    #[arg(long, requires = "open")]
    pub with_token: bool,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// A workflow's name: its runs you may see (default: the runs you started).
    #[arg(long, value_name = "NAME")]
    pub workflow: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct PageArgs {
    /// Items per page (1–100).
    #[arg(long)]
    pub limit: Option<u32>,
    /// The cursor a previous page gave as `next`.
    #[arg(long, value_name = "CURSOR")]
    pub next: Option<String>,
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    #[command(flatten)]
    pub source: SourceArgs,
}

/// After a steering call: follow the run as `run` does (and exit as it does).
#[derive(Debug, Args)]
pub struct FollowArg {
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    pub run: String,
    /// The review or input step answered (none: resume a paused run or raise its budget).
    #[arg(long)]
    pub step: Option<String>,
    /// A review's decision.
    #[arg(long, value_enum, requires = "step", conflicts_with_all = ["values", "text"])]
    pub decision: Option<Decision>,
    /// With --decision edit: the reviewer's output (JSON, or @FILE).
    #[arg(long, value_name = "JSON|@FILE", requires = "decision")]
    pub output: Option<String>,
    /// An input step's values: a JSON object, or @FILE.
    #[arg(long, value_name = "JSON|@FILE", requires = "step", conflicts_with = "text")]
    pub values: Option<String>,
    /// An input step's answer in words, read by its extract model.
    #[arg(long, requires = "step")]
    pub text: Option<String>,
    #[arg(long)]
    pub comment: Option<String>,
    #[command(flatten)]
    pub budget: BudgetArgs,
    #[command(flatten)]
    pub follow: FollowArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Decision {
    Approve,
    Reject,
    Edit,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
            Decision::Edit => "edit",
        }
    }
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    pub run: String,
    pub step: String,
    #[arg(long)]
    pub comment: Option<String>,
    /// The revision you saw; a stale one is refused instead of starting another.
    #[arg(long)]
    pub revision: Option<u32>,
    #[command(flatten)]
    pub budget: BudgetArgs,
    #[command(flatten)]
    pub follow: FollowArg,
}

#[derive(Debug, Args)]
pub struct OverrideArgs {
    pub run: String,
    pub step: String,
    /// The step's new output: JSON, or @FILE.
    #[arg(long, value_name = "JSON|@FILE")]
    pub output: String,
    /// The step's text (default: the output as the API derives it).
    #[arg(long)]
    pub text: Option<String>,
    #[arg(long)]
    pub comment: Option<String>,
    #[arg(long)]
    pub revision: Option<u32>,
    #[command(flatten)]
    pub follow: FollowArg,
}

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// Store a definition: a new workflow, or with --id a new version of one.
    Push {
        /// A workflow definition, or a body with `workflow` (and `visibility`, `shares`).
        file: PathBuf,
        /// The stored workflow to write a new version of.
        #[arg(long)]
        id: Option<String>,
        /// Who may see and run a new workflow: PRIVATE, SHARED, AUTHED, PUBLIC, ADMIN_ONLY.
        #[arg(long, conflicts_with = "id")]
        visibility: Option<String>,
    },
    /// The stored workflows you may see.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// A stored workflow's definition and metadata.
    Show {
        id: String,
        #[arg(long)]
        version: Option<u32>,
    },
}

/// A raise of the run's budget (a resume of a run paused on its budget, or a retry's new
/// revision).
#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// Raise the run's budget to this many dollars (a decimal, read exactly).
    #[arg(long, value_name = "USD")]
    pub max_cost_usd: Option<String>,
    /// Raise the run's token budget.
    #[arg(long, value_name = "TOKENS")]
    pub max_total_tokens: Option<u64>,
}
