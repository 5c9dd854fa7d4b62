//! bucketfs: a FUSE filesystem that makes a local directory be an S3 bucket.
//!
//! The crate is layered so that each layer can be tested without the one above it
//! (see `docs/ARCHITECTURE.md`):
//!
//! - [`store`]: the `ObjectStore` seam and its implementations (S3, local directory, memory);
//! - [`fs`]: the filesystem core — inodes, handles, POSIX semantics — on plain domain types;
//! - [`fuse`]: the thin adapter from `fuser` requests onto the core;
//! - [`cli`] and [`config`]: flags and environment turned into one [`config::Config`];
//! - [`mount`]: wiring it all together for the binary (and the integration tests);
//! - [`service`]: notifying a supervisor (systemd `Type=notify`);
//! - [`helper`]: the mount(8) helper `mount.fuse.bucketfs` (fstab).

pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod helper;
pub mod meta;
pub mod metrics;
pub mod mount;
pub mod read;
pub mod service;
pub mod store;
pub mod upload;
pub mod writeback;
