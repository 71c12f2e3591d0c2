//! The command line's duration flags, found by their value type, so a test covers every one
//! (present and future) without a list to keep in step.

use std::any::TypeId;
use std::time::Duration;

use clap::CommandFactory;

/// A flag that takes a duration.
pub struct DurationFlag {
    /// The subcommand, e.g. `controller`.
    pub subcommand: String,
    /// The long option without dashes, e.g. `queue-timeout`.
    pub long: String,
    /// The environment variable, e.g. `BOB_QUEUE_TIMEOUT`.
    pub env: String,
}

/// Every flag of every subcommand whose value is a `Duration`.
pub fn duration_flags() -> Vec<DurationFlag> {
    let mut out = Vec::new();
    for sub in bob::cli::Cli::command().get_subcommands() {
        for arg in sub.get_arguments() {
            if arg.get_value_parser().type_id() == TypeId::of::<Duration>() {
                out.push(DurationFlag {
                    subcommand: sub.get_name().to_string(),
                    long: arg.get_long().expect("duration flags are long options").to_string(),
                    env: arg.get_env().expect("every flag has an env var").to_string_lossy().into_owned(),
                });
            }
        }
    }
    out
}
