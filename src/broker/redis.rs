//! Redis broker (kombu layout).
