//! API keys: made, listed and revoked by admins, each within the namespaces it administers.

use aiki_proto::v1::ApiKey;

use super::{Caller, Engine, Op};
use crate::{
    auth::{self, Key, Role},
    error::{Error, Result},
    validate,
};

/// Most namespaces one key may be bound to.
const MAX_NAMESPACES: usize = 100;
/// Most keys one list answers.
const MAX_LISTED: i64 = 1000;

/// A request for a new key.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub role: Role,
    pub namespaces: Vec<String>,
    pub rate_limit: u32,
}

impl TryFrom<&aiki_proto::v1::CreateApiKeyRequest> for NewKey {
    type Error = Error;
    fn try_from(r: &aiki_proto::v1::CreateApiKeyRequest) -> Result<Self> {
        let name = validate::name("name", &r.name, 200)?;
        let role: Role = r.role.parse()?;
        if r.namespaces.is_empty() {
            return Err(Error::InvalidArgument(
                "a key needs at least one namespace (`*` for every namespace)".into(),
            ));
        }
        if r.namespaces.len() > MAX_NAMESPACES {
            return Err(Error::InvalidArgument(format!(
                "a key may be bound to at most {MAX_NAMESPACES} namespaces, got {}",
                r.namespaces.len()
            )));
        }
        let mut namespaces = Vec::with_capacity(r.namespaces.len());
        for ns in &r.namespaces {
            let ns = if ns == "*" {
                ns.clone()
            } else {
                validate::name("namespace", ns, 64)?
            };
            if !namespaces.contains(&ns) {
                namespaces.push(ns);
            }
        }
        Ok(Self {
            name,
            role,
            namespaces,
            rate_limit: r.rate_limit,
        })
    }
}

impl Engine {
    /// Checks that `caller` administers every namespace of a key (`*` needs an admin of `*`).
    fn authorize_keys(&self, caller: &Caller, namespaces: &[String]) -> Result<()> {
        for ns in namespaces {
            match caller {
                Caller::Key(k) if ns == "*" && !k.namespaces.iter().any(|n| n == "*") => {
                    return Err(Error::PermissionDenied(format!(
                        "API key {} may not manage keys for every namespace (`*`): that needs an admin key of `*`",
                        k.label()
                    )));
                }
                _ => self.authorize(caller, Op::ManageKeys, ns)?,
            }
        }
        Ok(())
    }

    /// Checks that `caller` administers some namespace: an admin key, whatever its namespaces
    /// (the message of the first one's refusal says what it lacks).
    fn authorize_some_admin(&self, caller: &Caller) -> Result<()> {
        match caller {
            Caller::Key(k) => {
                let ns = k.namespaces.first().map(String::as_str).unwrap_or("default");
                self.authorize(caller, Op::ManageKeys, ns)
            }
            Caller::Anonymous => Ok(()),
        }
    }

    /// Makes a key; answers it and its secret (shown this once).
    pub async fn create_key(&self, caller: &Caller, new: NewKey) -> Result<(ApiKey, String)> {
        self.authorize_keys(caller, &new.namespaces)?;
        let secret = auth::new_secret();
        let key = Key {
            id: secret.id,
            name: new.name,
            role: new.role,
            namespaces: new.namespaces,
            rate_limit: new.rate_limit,
        };
        let by = match caller {
            Caller::Anonymous => "anonymous".to_owned(),
            Caller::Key(k) => k.label(),
        };
        let listed = self.store.create_api_key(&key, &secret.digest, &by).await?;
        tracing::info!(key_id = %key.id, role = %key.role, by, "API key created");
        Ok((listed, secret.token))
    }

    /// The keys that share a namespace with the caller's.
    pub async fn list_keys(&self, caller: &Caller, include_revoked: bool) -> Result<Vec<ApiKey>> {
        self.authorize_some_admin(caller)?;
        let namespaces = match caller {
            Caller::Anonymous => vec!["*".to_owned()],
            Caller::Key(k) => k.namespaces.clone(),
        };
        self.store.list_api_keys(&namespaces, include_revoked, MAX_LISTED).await
    }

    /// Revokes a key of namespaces the caller administers. A key the caller may not manage
    /// and a key that does not exist get the same answer.
    pub async fn revoke_key(&self, caller: &Caller, id: &str) -> Result<ApiKey> {
        let id = validate::uuid("id", id)?;
        let missing = || Error::NotFound(format!("no API key {id} that this caller manages"));
        if id == auth::BOOTSTRAP_ID {
            return Err(Error::FailedPrecondition(
                "the bootstrap admin key is set in the server's settings (admin_key): change it there".into(),
            ));
        }
        self.authorize_some_admin(caller)?;
        let stored = self.store.api_key(id).await?.ok_or_else(missing)?;
        if self.authorize_keys(caller, &stored.key.namespaces).is_err() {
            return Err(missing());
        }
        let revoked = self.store.revoke_api_key(id).await?.ok_or_else(missing)?;
        self.keys.forget(id);
        tracing::info!(key_id = %id, "API key revoked");
        Ok(revoked)
    }
}
