//! Aiki's end-to-end tests, one module per topic, in one test binary: the server, the client,
//! the worker runtime and the workspace's binaries, against a real PostgreSQL over loopback.
//! Each test gets a database of its own; `aiki_tests` (the crate's `src/lib.rs`) holds the
//! shared set-up: a test of the client or the worker runtime starts from a `TestEnv` (a
//! database, a server, a client) and runs its workflows with `env.worker(builder)`.
//!
//! One binary links the whole server once instead of once per topic. Run one topic with
//! `cargo test -p aiki-tests --test it -- events::` (after `cargo build --workspace`: some
//! tests run the workspace's binaries).

mod auth;
mod bad_input;
mod bench;
mod binaries;
mod cancel;
mod children;
mod connections;
mod events;
mod idempotency;
mod lease_loss;
mod leasing;
mod limits;
mod migrations;
mod operations;
mod pause;
mod payload_depth;
mod pg_tls;
mod recovery;
mod reflection;
mod reports;
mod retries;
mod sleep;
mod task_retries;
mod timeouts;
mod tls;
mod versions;
mod wakeup;
mod worker_runtime;
