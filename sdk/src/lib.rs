//! Aiki's Rust client, for applications that start workflow runs and read their results. It
//! holds no worker code: writing workflows and executing them is the worker runtime's part
//! (crate `aiki-worker`: `Context`, `WorkflowError`, `WorkerBuilder`).
//!
//! - [`Client`] starts runs ([`Client::start_run`], idempotent by key or by a generated request
//!   id; [`Client::start_runs`] for a batch), reads them ([`Client::get`], [`Client::list`],
//!   [`Client::history`], [`Client::watch`]), waits for them ([`RunHandle::result`]), cancels,
//!   pauses, resumes and wakes them, sends them events ([`Client::send_event`]), and lists the
//!   registered workers, queues and workflow versions. Calls retry with backoff while the
//!   server is unavailable, but connecting where nothing listens fails at once; errors are typed ([`Error`]; [`RunError`] says how a run failed).
//! - [`connect_channel`] opens a channel to a server, for the generated clients of [`proto`].
//! - [`TlsOptions`] with [`Client::connect_with`] or [`connect_channel_with`]: `https://`
//!   servers with a private CA, and client certificates for servers that require them.
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

pub use aiki_proto::v1::RunStatus;
pub use client::{
    ApiKey, AuthChannel, Client, EventSent, HistoryEvent, ListFilter, Queue, RetryPolicy, Run, RunHandle, RunPage,
    StartOptions, Timeouts, TlsOptions, Worker, WorkflowVersion, connect_channel, connect_channel_with,
};
pub use error::{Error, Result, RunError};

/// The generated protocol, for advanced use.
pub use aiki_proto as proto;
