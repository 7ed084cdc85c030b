//! The stores the engine owns: data objects, metadata, databases.

pub mod data;
pub mod database;
pub mod meta;
