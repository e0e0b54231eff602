//! Workers and the workflow versions they register, with the caches that spare a statement per
//! poll (registrations) and per start (versions).

use super::*;

impl Store {
    /// Registers a worker serving `workflows` (name, version) on `queues`, records the
    /// versions it brings, and returns its id.
    #[instrument(name = "store.worker.register", skip_all)]
    pub async fn register_worker(&self, w: &NewWorker<'_>) -> Result<Uuid> {
        let NewWorker {
            namespace,
            identity,
            host,
            workflows,
            queues,
            slots,
            key,
        } = *w;
        let id = Uuid::now_v7();
        let json = Json::Array(
            workflows
                .iter()
                .map(|(name, version)| json!({"name": name, "version": version}))
                .collect(),
        );
        let (names, versions): (Vec<&str>, Vec<&str>) = workflows
            .iter()
            .filter(|(name, _)| name != "*")
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .unzip();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            &tx.prepare_cached(sql!("workers/register")).await?,
            &[&namespace, &id, &identity, &host, &json, &queues, &(slots as i32), &key],
        )
        .await?;
        tx.execute(
            &tx.prepare_cached(sql!("workers/register_versions")).await?,
            &[&namespace, &names, &versions],
        )
        .await?;
        tx.commit().await?;
        for (name, _) in workflows {
            self.versions.forget(namespace, name);
        }
        Ok(id)
    }

    /// What a worker registered, or `None` if it is unknown.
    #[instrument(name = "store.worker.registration", skip_all)]
    pub async fn worker_registration(&self, namespace: &str, id: Uuid) -> Result<Option<Arc<Registration>>> {
        if let Some((ns, r)) = self
            .registrations
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            && ns == namespace
        {
            return Ok(Some(r.clone()));
        }
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("workers/queues")).await?;
        let Some(row) = client.query_opt(&stmt, &[&namespace, &id]).await? else {
            return Ok(None);
        };
        let workflows: Json = row.get("workflows");
        let (mut names, mut pinned) = (Vec::new(), Vec::new());
        for w in workflows.as_array().into_iter().flatten() {
            let name = w.get("name").and_then(Json::as_str).unwrap_or_default();
            let version = w.get("version").and_then(Json::as_str).unwrap_or_default();
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
            if !version.is_empty() {
                pinned.push(format!("{name}\n{version}"));
            }
        }
        let registration = Arc::new(Registration {
            queues: row.get("queues"),
            workflows: names,
            versions: pinned,
            key: row.get("key_id"),
        });
        let mut entries = self.registrations.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_REGISTRATIONS {
            entries.clear();
        }
        entries.insert(id, (namespace.to_owned(), registration.clone()));
        Ok(Some(registration))
    }

    /// Registered workflow versions, with the workers that heartbeat within `live` serving
    /// each; the newest version of each workflow is marked `latest`.
    #[instrument(name = "store.workflows.list", skip_all)]
    pub async fn list_workflows(&self, namespace: &str, live: Duration) -> Result<Vec<WorkflowVersion>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("workers/workflows")).await?;
        let mut out: Vec<WorkflowVersion> = Vec::new();
        for row in client.query(&stmt, &[&namespace, &ms(live)]).await? {
            let workflow: String = row.get("workflow");
            let version: String = row.get("version");
            // Rows come newest first within a workflow: the first pinned version is the latest.
            let latest = !version.is_empty() && !out.iter().any(|w| w.workflow == workflow && !w.version.is_empty());
            let ids: Vec<Uuid> = row.get("worker_ids");
            out.push(WorkflowVersion {
                workflow,
                version,
                latest,
                registered_at: Some(row.get::<_, SystemTime>("registered_at").into()),
                last_seen_at: Some(row.get::<_, SystemTime>("last_seen_at").into()),
                worker_ids: ids.iter().map(Uuid::to_string).collect(),
                worker_identities: row.get("identities"),
            });
        }
        Ok(out)
    }

    /// Forgets up to `limit` workers silent for `retention` that hold no lease (see
    /// `sql/workers/forget.sql`); answers how many.
    #[instrument(name = "store.workers.forget", skip_all)]
    pub async fn forget_workers(&self, retention: Duration, limit: i64) -> Result<u64> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("workers/forget")).await?;
        Ok(client.execute(&stmt, &[&ms(retention), &limit]).await?)
    }

    /// Workers of a namespace, most recently seen first.
    #[instrument(name = "store.workers.list", skip_all)]
    pub async fn list_workers(&self, namespace: &str, live: Duration) -> Result<Vec<Worker>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("workers/list")).await?;
        client
            .query(&stmt, &[&namespace, &ms(live)])
            .await?
            .iter()
            .map(worker_from_row)
            .collect()
    }
}

/// A worker to register.
#[derive(Debug, Clone, Copy)]
pub struct NewWorker<'a> {
    pub namespace: &'a str,
    pub identity: &'a str,
    pub host: &'a str,
    /// (name, version); name `*`: every workflow.
    pub workflows: &'a [(String, String)],
    pub queues: &'a [String],
    pub slots: u32,
    /// The API key that registers it.
    pub key: Option<Uuid>,
}

/// What a worker registered: its queues, the workflows whose unpinned runs it serves (`*`:
/// all), and the versions whose pinned runs it serves ("workflow\nversion").
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub queues: Vec<String>,
    pub workflows: Vec<String>,
    pub versions: Vec<String>,
    /// The API key that registered the worker (`None`: registered without authentication);
    /// only that key may poll and heartbeat as it, and report under its leases.
    pub key: Option<Uuid>,
}

/// Worker registrations read so far. A registration never changes (`RegisterWorker` always
/// inserts a worker with a new id), so what was read once stays true, on every server: a poll
/// needs no statement to learn what its worker serves (at 1,000 runs/s a worker polls about as
/// often). It is deleted only when its worker is forgotten, after `worker_retention` of
/// silence; a cached one then serves the polls of a worker silent that long, whose leases its
/// next heartbeat finds lost (it is told it is unknown, and registers again).
/// Keyed by worker id alone (ids are unique across namespaces), each with its namespace.
#[derive(Default)]
pub(super) struct RegistrationCache {
    entries: std::sync::Mutex<HashMap<Uuid, (String, Arc<Registration>)>>,
}

/// Most registrations kept; when full, the cache starts again empty.
pub(super) const MAX_REGISTRATIONS: usize = 10_000;

/// How long the versions of a workflow are taken from memory before the database is asked
/// again. A version registered through another server is the newest for this server's starts
/// at most this late; registrations through this server are seen at once, and a start naming
/// a version not in memory always asks the database.
pub(super) const VERSION_CACHE_TTL: Duration = Duration::from_secs(1);

/// A workflow's registered versions, newest first, and when they were read.
pub(super) type Versions = (std::time::Instant, Vec<String>);

/// Registered versions by (namespace, workflow).
#[derive(Debug, Default)]
pub(super) struct VersionCache {
    entries: std::sync::Mutex<HashMap<(String, String), Versions>>,
}

impl VersionCache {
    pub(super) fn get(&self, namespace: &str, workflow: &str) -> Option<Vec<String>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(namespace.to_owned(), workflow.to_owned()))
            .filter(|(at, _)| at.elapsed() < VERSION_CACHE_TTL)
            .map(|(_, v)| v.clone())
    }

    pub(super) fn put(&self, namespace: &str, workflow: &str, versions: Vec<String>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() > 10_000 {
            entries.retain(|_, (at, _)| at.elapsed() < VERSION_CACHE_TTL);
        }
        entries.insert(
            (namespace.to_owned(), workflow.to_owned()),
            (std::time::Instant::now(), versions),
        );
    }

    pub(super) fn forget(&self, namespace: &str, workflow: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&(namespace.to_owned(), workflow.to_owned()));
    }
}
