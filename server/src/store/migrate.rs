//! Embedded, ordered SQL migrations, applied in one transaction under an advisory lock so
//! that any number of servers (and `aiki migrate`) may start at once.

use deadpool_postgres::Client;

use crate::error::Result;

/// Every migration, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "init", include_str!("../../../migrations/0001_init.sql"))];

/// A fixed key for `pg_advisory_xact_lock`: "aiki" + 1.
const MIGRATION_LOCK: i64 = 0x6169_6b69_0000_0001;

/// Applies the migrations not applied yet; returns the names of those it applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static str>> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS aiki_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM aiki_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut done = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO aiki_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tracing::info!(version, name, "applied migration");
        done.push(*name);
    }
    tx.commit().await?;
    Ok(done)
}
