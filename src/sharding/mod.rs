//! Shard functions: which shard a key belongs to.

pub mod hash;
