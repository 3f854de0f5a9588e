//! Unit tests of the partition state machine (added below).
