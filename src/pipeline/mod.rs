//! Between source and sinks: what may be acknowledged upstream.
//!
//! Owns the delivery watermark ([`progress`]). It does not move data; the capture loop hands
//! changes to the sink directly and consults the watermark for standby status updates.

pub mod progress;
pub mod snapshot_progress;
