//! Embedded, ordered SQL migrations, applied in one transaction under an advisory lock so
//! that any number of servers (and `aiki migrate`) may start at once.

use deadpool_postgres::Client;

use crate::error::Result;

/// Every migration, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/0001_init.sql")),
    (2, "throughput", include_str!("../../../migrations/0002_throughput.sql")),
    (3, "pause", include_str!("../../../migrations/0003_pause.sql")),
    (4, "sleep", include_str!("../../../migrations/0004_sleep.sql")),
    (5, "waits", include_str!("../../../migrations/0005_waits.sql")),
    (6, "versions", include_str!("../../../migrations/0006_versions.sql")),
    (7, "timeouts", include_str!("../../../migrations/0007_timeouts.sql")),
    (
        8,
        "lease_events",
        include_str!("../../../migrations/0008_lease_events.sql"),
    ),
    (9, "child_wake", include_str!("../../../migrations/0009_child_wake.sql")),
    (
        10,
        "final_tasks",
        include_str!("../../../migrations/0010_final_tasks.sql"),
    ),
    (
        11,
        "final_task_seqs",
        include_str!("../../../migrations/0011_final_task_seqs.sql"),
    ),
    (12, "ready_key", include_str!("../../../migrations/0012_ready_key.sql")),
    (
        13,
        "queue_place",
        include_str!("../../../migrations/0013_queue_place.sql"),
    ),
    (
        14,
        "transitions",
        include_str!("../../../migrations/0014_transitions.sql"),
    ),
    (15, "api_keys", include_str!("../../../migrations/0015_api_keys.sql")),
];

/// A fixed key for `pg_advisory_xact_lock`: "aiki" + 1.
const MIGRATION_LOCK: i64 = 0x6169_6b69_0000_0001;

/// Applies the migrations not applied yet; returns the names of those it applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static str>> {
    let tx = client.transaction().await?;
    tx.execute(sql!("migrations/lock"), &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(sql!("migrations/table")).await?;
    let applied: Vec<i32> = tx
        .query(sql!("migrations/applied"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut done = Vec::new();
    for (version, name, migration) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(migration).await?;
        tx.execute(sql!("migrations/record"), &[version, name]).await?;
        tracing::info!(version, name, "applied migration");
        done.push(*name);
    }
    tx.commit().await?;
    Ok(done)
}
