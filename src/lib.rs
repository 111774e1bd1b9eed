//! tokenproxy: a sidecar proxy that adds fresh OAuth Bearer tokens to an application's outgoing
//! calls. See README.md for use and `../shared/SPEC.md` for the contract.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod app;
pub mod audit;
pub mod body;
pub mod callers;
pub mod cli;
pub mod config;
pub mod demo;
pub mod drain;
pub mod egress;
pub mod errors;
pub mod fsutil;
pub mod grants;
pub mod hosts;
pub mod logging;
pub mod metrics;
pub mod oauth;
pub mod onboarding;
pub mod presets;
pub mod proxy;
pub mod query;
pub mod relay;
pub mod secrets;
pub mod server;
pub mod shards;
pub mod sigv4;
pub mod tls;
pub mod token_command;
pub mod tokens;
pub mod transparent;
