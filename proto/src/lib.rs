//! Aiki's wire protocol: the `aiki.v1` messages, the gRPC clients and servers generated from
//! `aiki/v1/aiki.proto`, and the conversions between `google.protobuf.Value` and
//! `serde_json::Value` that every other crate uses for payloads.

#![allow(missing_docs, clippy::large_enum_variant, clippy::doc_lazy_continuation)]

/// Generated code of package `aiki.v1`.
pub mod v1 {
    tonic::include_proto!("aiki.v1");
}

mod json;

pub use json::{JsonError, MAX_PAYLOAD_DEPTH, TooDeep, check_depth, json_depth, json_to_value, value_to_json};
pub use prost_types;

/// The version of the workspace and the commit it was built from, as every binary's
/// `--version` shows it: `0.1.0 (commit 0123456789ab)`.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("AIKI_COMMIT"), ")");

/// The encoded `FileDescriptorSet` of `aiki.v1` and its imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/aiki_descriptor.bin"));

/// Converts a `std::time::Duration` to its protobuf form (saturating).
pub fn duration_to_proto(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Converts a protobuf duration to `std::time::Duration`; `None` if it is negative or malformed.
pub fn duration_from_proto(d: &prost_types::Duration) -> Option<std::time::Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    Some(std::time::Duration::new(d.seconds as u64, d.nanos as u32))
}

impl v1::RunStatus {
    /// True for COMPLETED, FAILED and CANCELLED.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The lowercase name used in storage, the CLI and logs (`queued`, `running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Suspended => "suspended",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Paused => "paused",
        }
    }

    /// Parses the lowercase name (the inverse of [`Self::as_str`]).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "suspended" => Self::Suspended,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "paused" => Self::Paused,
            _ => return None,
        })
    }
}

impl v1::EventType {
    /// The lowercase name used in storage and the CLI (`run_created`, `task_recorded`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::RunCreated => "run_created",
            Self::RunLeased => "run_leased",
            Self::TaskRecorded => "task_recorded",
            Self::RunCompleted => "run_completed",
            Self::RunRetryScheduled => "run_retry_scheduled",
            Self::RunFailed => "run_failed",
            Self::LeaseExpired => "lease_expired",
            Self::LeaseReleased => "lease_released",
            Self::CancelRequested => "cancel_requested",
            Self::RunCancelled => "run_cancelled",
            Self::PauseRequested => "pause_requested",
            Self::RunPaused => "run_paused",
            Self::RunResumed => "run_resumed",
            Self::RunSuspended => "run_suspended",
            Self::RunWoken => "run_woken",
            Self::EventReceived => "event_received",
            Self::ChildStarted => "child_started",
            Self::ChildEnded => "child_ended",
            Self::TimedOut => "timed_out",
        }
    }

    /// Parses the lowercase name (the inverse of [`Self::as_str`]).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "run_created" => Self::RunCreated,
            "run_leased" => Self::RunLeased,
            "task_recorded" => Self::TaskRecorded,
            "run_completed" => Self::RunCompleted,
            "run_retry_scheduled" => Self::RunRetryScheduled,
            "run_failed" => Self::RunFailed,
            "lease_expired" => Self::LeaseExpired,
            "lease_released" => Self::LeaseReleased,
            "cancel_requested" => Self::CancelRequested,
            "run_cancelled" => Self::RunCancelled,
            "pause_requested" => Self::PauseRequested,
            "run_paused" => Self::RunPaused,
            "run_resumed" => Self::RunResumed,
            "run_suspended" => Self::RunSuspended,
            "run_woken" => Self::RunWoken,
            "event_received" => Self::EventReceived,
            "child_started" => Self::ChildStarted,
            "child_ended" => Self::ChildEnded,
            "timed_out" => Self::TimedOut,
            _ => return None,
        })
    }
}
