//! Topic names and filters (being written).
