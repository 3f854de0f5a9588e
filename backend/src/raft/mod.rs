pub mod storage;
pub mod node;
