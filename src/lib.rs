//! Wiring of the `tiermq` binary.
