//! Aiki from Rust: a worker that serves a two-step workflow, and a client that starts a run
//! with an idempotency key and waits for its result.
//!
//! Run it against a server (e.g. the one `aiki dev` starts):
//! `cargo run -p aiki-worker --example quickstart`

use std::time::Duration;

use aiki::{Client, StartOptions};
use aiki_worker::{Context, WorkerBuilder, WorkflowError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Order {
    id: u64,
    cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    order: u64,
    charge: String,
    email: String,
}

/// Each `ctx.task` runs once per run: if the worker crashes after "charge", the run is
/// re-executed elsewhere, gets the recorded charge back and only sends the email.
async fn process_order(ctx: Context, order: Order) -> Result<Receipt, WorkflowError> {
    let charge: String = ctx
        .task("charge", order.cents, |cents| async move {
            Ok::<_, WorkflowError>(format!("ch_{cents}"))
        })
        .await?;
    let email: String = ctx
        .task("email", order.id, |id| async move {
            Ok::<_, WorkflowError>(format!("receipt sent for order {id}"))
        })
        .await?;
    Ok(Receipt {
        order: order.id,
        charge,
        email,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("AIKI_SERVER").unwrap_or_else(|_| "http://127.0.0.1:7070".into());

    // A worker, usually its own process in your infrastructure.
    let worker = WorkerBuilder::new(&server)
        .queue("orders")
        .register("process-order", process_order)
        .build()
        .await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(worker.run(stop.clone()));

    // A client: start a run once per order, whatever the retries, and wait for it.
    let client = Client::connect(&server).await?;
    let options = StartOptions {
        queue: Some("orders".into()),
        ..StartOptions::key("order-1001")
    };
    let run = client
        .start_run("process-order", &Order { id: 1001, cents: 4200 }, options)
        .await?;
    println!("run {} (created: {})", run.id, run.created);
    let receipt: Receipt = run.result(Duration::from_secs(30)).await?;
    println!("{receipt:?}");

    stop.cancel();
    worker.await??;
    Ok(())
}
