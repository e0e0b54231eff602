//! A run's status: the one enum the server decides with. Its text form is the SQL mapping
//! (`runs.status` holds `queued`, `running`, ...): [`RunStatus::as_sql`], and the
//! `ToSql`/`FromSql` impls that bind and read it; nowhere else does the server spell a status.

use std::fmt;

use aiki_proto::v1;
use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// Where a run is in its life (see the states in ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    /// Waiting in its queue for a worker (possibly not visible yet).
    Queued,
    /// Leased to a worker.
    Running,
    /// Waiting (sleep, event, child) without a worker.
    Suspended,
    /// Ended with an output.
    Completed,
    /// Ended with an error.
    Failed,
    /// Ended by a cancellation.
    Cancelled,
    /// Held out of its queue until resumed.
    Paused,
}

impl RunStatus {
    /// Every status.
    pub const ALL: [RunStatus; 7] = [
        Self::Queued,
        Self::Running,
        Self::Suspended,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::Paused,
    ];

    /// The text stored in `runs.status`: the protocol's lowercase name of the status.
    pub fn as_sql(self) -> &'static str {
        self.to_proto().as_str()
    }

    /// The status stored as `s`.
    pub fn from_sql(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_sql() == s)
    }

    /// Completed, failed or cancelled: the run will not change again.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The status as the protocol names it.
    pub const fn to_proto(self) -> v1::RunStatus {
        match self {
            Self::Queued => v1::RunStatus::Queued,
            Self::Running => v1::RunStatus::Running,
            Self::Suspended => v1::RunStatus::Suspended,
            Self::Completed => v1::RunStatus::Completed,
            Self::Failed => v1::RunStatus::Failed,
            Self::Cancelled => v1::RunStatus::Cancelled,
            Self::Paused => v1::RunStatus::Paused,
        }
    }

    /// The status a protocol value names; `None` for `UNSPECIFIED` and unknown values.
    pub fn from_proto(status: i32) -> Option<Self> {
        match v1::RunStatus::try_from(status).ok()? {
            v1::RunStatus::Unspecified => None,
            v1::RunStatus::Queued => Some(Self::Queued),
            v1::RunStatus::Running => Some(Self::Running),
            v1::RunStatus::Suspended => Some(Self::Suspended),
            v1::RunStatus::Completed => Some(Self::Completed),
            v1::RunStatus::Failed => Some(Self::Failed),
            v1::RunStatus::Cancelled => Some(Self::Cancelled),
            v1::RunStatus::Paused => Some(Self::Paused),
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_sql())
    }
}

impl serde::Serialize for RunStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_sql())
    }
}

impl ToSql for RunStatus {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.as_sql().to_sql(ty, out)
    }

    fn accepts(ty: &Type) -> bool {
        <&str as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for RunStatus {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let s = <&str as FromSql>::from_sql(ty, raw)?;
        RunStatus::from_sql(s).ok_or_else(|| format!("unknown run status {s:?}").into())
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_maps_both_ways() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::from_sql(s.as_sql()), Some(s));
            assert_eq!(RunStatus::from_proto(s.to_proto() as i32), Some(s));
            assert_eq!(s.to_proto().as_str(), s.as_sql(), "the protocol's names are the same");
        }
        assert_eq!(RunStatus::from_sql("done"), None);
        assert_eq!(RunStatus::from_proto(0), None);
    }
}
