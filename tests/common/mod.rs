//! Shared harness of the integration tests: real S3 servers ([`s3`]) and real mounts ([`mount`]).
#![allow(dead_code)]

pub mod mount;
pub mod proxy;
pub mod s3;
