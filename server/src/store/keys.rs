//! API keys (see `auth`): their digests, roles and namespaces.

use super::*;
use crate::auth::{Key, Role, StoredKey};

impl Store {
    /// Key `id`, revoked or not, for authentication; `None` if no key has this id.
    #[instrument(name = "store.keys.get", skip_all)]
    pub async fn api_key(&self, id: Uuid) -> Result<Option<StoredKey>> {
        Ok(self.api_keys_by_id(&[id]).await?.pop())
    }

    /// The keys among `ids` (revoked ones too), for authentication.
    #[instrument(name = "store.keys.by_id", skip_all, fields(count = ids.len()))]
    pub async fn api_keys_by_id(&self, ids: &[Uuid]) -> Result<Vec<StoredKey>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("keys/get")).await?;
        client
            .query(&stmt, &[&ids])
            .await?
            .iter()
            .map(|row| {
                let role: String = row.get("role");
                Ok(StoredKey {
                    key: Arc::new(Key {
                        id: row.get("id"),
                        name: row.get("name"),
                        role: role.parse::<Role>()?,
                        namespaces: row.get("namespaces"),
                        rate_limit: row.get::<_, i32>("rate_limit").max(0) as u32,
                    }),
                    digest: row.get("digest"),
                    revoked: row.get("revoked"),
                })
            })
            .collect()
    }

    /// Stores a new key (only the digest of its secret); answers it as listed.
    #[instrument(name = "store.keys.create", skip_all)]
    pub async fn create_api_key(&self, key: &Key, digest: &[u8], created_by: &str) -> Result<aiki_proto::v1::ApiKey> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("keys/insert")).await?;
        let row = client
            .query_one(
                &stmt,
                &[
                    &key.id,
                    &key.name,
                    &key.role.as_str(),
                    &key.namespaces,
                    &digest,
                    &(key.rate_limit.min(i32::MAX as u32) as i32),
                    &created_by,
                ],
            )
            .await?;
        Ok(aiki_proto::v1::ApiKey {
            id: key.id.to_string(),
            name: key.name.clone(),
            role: key.role.as_str().to_owned(),
            namespaces: key.namespaces.clone(),
            rate_limit: key.rate_limit,
            created_at: Some(ts(row.get("created_at"))),
            created_by: created_by.to_owned(),
            revoked_at: None,
        })
    }

    /// Keys that share a namespace with `namespaces` (`*`: all keys), at most `limit`.
    #[instrument(name = "store.keys.list", skip_all)]
    pub async fn list_api_keys(
        &self,
        namespaces: &[String],
        include_revoked: bool,
        limit: i64,
    ) -> Result<Vec<aiki_proto::v1::ApiKey>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("keys/list")).await?;
        client
            .query(&stmt, &[&namespaces, &include_revoked, &limit])
            .await?
            .iter()
            .map(api_key_from_row)
            .collect()
    }

    /// Revokes key `id`; answers it, or `None` if there is none.
    #[instrument(name = "store.keys.revoke", skip_all)]
    pub async fn revoke_api_key(&self, id: Uuid) -> Result<Option<aiki_proto::v1::ApiKey>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql!("keys/revoke")).await?;
        client
            .query_opt(&stmt, &[&id])
            .await?
            .as_ref()
            .map(api_key_from_row)
            .transpose()
    }
}
