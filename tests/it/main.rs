//! Integration tests against a real S3-protocol server (s3s-fs, started by scripts/test.sh).

mod audit;
mod audit_safety;
mod bad_input;
mod check;
mod cli;
mod control;
mod daemon;
mod faults;
mod faults_local;
mod faults_proxy;
mod faults_support;
mod metrics;
mod packaging;
mod proxy;
mod security;
mod support;
mod sweep;
mod synapse_config;
mod systemd;
mod upload;
mod verified;
