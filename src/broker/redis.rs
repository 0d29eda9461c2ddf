//! The Redis broker (in progress).
