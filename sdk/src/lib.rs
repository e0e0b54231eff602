//! Aiki's Rust SDK.
//!
//! - [`Client`] starts runs ([`Client::start_run`], idempotent by key or by a generated request
//!   id), reads them ([`Client::get`], [`Client::list`], [`Client::history`]), waits for them
//!   ([`RunHandle::result`]) and cancels them. Calls retry with backoff while the server is
//!   unreachable; errors are typed ([`Error`]).
//! - [`workflow::Context`] is what workflow code running in a worker gets: [`Context::task`]
//!   checkpoints each step so that a re-executed run never repeats a completed one.
//!
//! ```no_run
//! # async fn demo() -> Result<(), aiki::Error> {
//! use std::time::Duration;
//! let client = aiki::Client::connect("http://127.0.0.1:7070").await?;
//! let run = client
//!     .start_run("greet", &serde_json::json!({"name": "Ada"}), aiki::StartOptions::key("greet-ada"))
//!     .await?;
//! let out: serde_json::Value = run.result(Duration::from_secs(30)).await?;
//! # Ok(()) }
//! ```

mod client;
mod error;
pub mod reporter;
pub mod workflow;

pub use aiki_proto::v1::RunStatus;
pub use client::{
    Client, EventSent, HistoryEvent, ListFilter, Queue, RetryPolicy, Run, RunHandle, RunPage, StartOptions, Timeouts,
    Worker, WorkflowVersion, connect_channel,
};
pub use error::{Error, Result, RunError};
pub use reporter::Reporter;
pub use workflow::{ChildRun, Context, TaskOptions, WaitFor, WorkflowError};

/// The generated protocol, for advanced use.
pub use aiki_proto as proto;
