//! A durable workflow: a subscription trial. It provisions the account in a child run, then
//! waits (holding no worker) for a payment event or the end of the trial, whichever comes
//! first. A crash of the worker or the server at any point loses nothing and repeats nothing.
//!
//! Run it against a server (e.g. the one `aiki dev` starts):
//! `cargo run -p aiki-worker --example trial`

use std::time::Duration;

use aiki::{Client, StartOptions};
use aiki_worker::{Context, WorkerBuilder, WorkflowError};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Trial {
    user: String,
    /// Seconds, to keep the example short; days in real life.
    length_secs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    cents: u64,
}

async fn trial(ctx: Context, t: Trial) -> Result<String, WorkflowError> {
    // A child run with its own retries and history; started once, however often this
    // workflow is re-executed.
    let account = ctx.start_child("provision", &t.user, StartOptions::default()).await?;
    let account: String = account
        .result()
        .await?
        .map_err(|e| WorkflowError::new("ProvisioningFailed", e.to_string()))?;
    ctx.task("welcome email", &account, |a| async move {
        Ok::<_, WorkflowError>(format!("welcome mail sent to {a}"))
    })
    .await?;
    // Suspends the run until a "payment" event arrives or the trial ends.
    let payment: Option<Payment> = ctx.wait_event("payment", Duration::from_secs(t.length_secs)).await?;
    match payment {
        Some(p) => {
            ctx.task("activate", p.cents, |cents| async move {
                Ok::<_, WorkflowError>(format!("subscribed, paid {cents} cents"))
            })
            .await
        }
        None => {
            ctx.task("downgrade", (), |()| async {
                Ok::<_, WorkflowError>("trial ended without payment".to_owned())
            })
            .await
        }
    }
}

async fn provision(ctx: Context, user: String) -> Result<String, WorkflowError> {
    ctx.task("create account", &user, |u| async move {
        Ok::<_, WorkflowError>(format!("acct-{u}"))
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("AIKI_SERVER").unwrap_or_else(|_| "http://127.0.0.1:7070".into());
    let worker = WorkerBuilder::new(&server)
        .queue("trials")
        .register("trial", trial)
        .register("provision", provision)
        .build()
        .await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(worker.run(stop.clone()));

    let client = Client::connect(&server).await?;
    let start = |user: &str, length_secs| {
        let options = StartOptions {
            queue: Some("trials".into()),
            ..StartOptions::key(format!("trial-{user}"))
        };
        let t = Trial {
            user: user.into(),
            length_secs,
        };
        let client = client.clone();
        async move { client.start_run("trial", &t, options).await }
    };
    let ada = start("ada", 3600).await?;
    let bob = start("bob", 2).await?;
    // Ada pays (the event key makes a resent webhook harmless); Bob does not.
    client
        .send_event_by_key("trial-ada", "payment", &Payment { cents: 900 }, Some("invoice-1"))
        .await?;
    let ada: String = ada.result(Duration::from_secs(30)).await?;
    let bob: String = bob.result(Duration::from_secs(30)).await?;
    println!("ada: {ada}");
    println!("bob: {bob}");

    stop.cancel();
    worker.await??;
    Ok(())
}
