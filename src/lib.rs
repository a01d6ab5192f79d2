//! quotad: a self-hosted quota and rate-limit daemon for AI products.
//!
//! Layers, outermost first: [`server`] (listeners, shutdown) → [`connections`]
//! (the connection cap, eviction, requests in flight) → [`api`] (HTTP,
//! JSON, auth) → [`engine`] (decisions over sharded counters, pure) →
//! [`journal`] (the seam to durable storage). [`clock`] is the only place that
//! reads the system clock.

pub mod api;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod engine;
pub mod events;
pub mod gateway;
pub mod journal;
pub mod loadgen;
pub mod metrics;
pub mod notify;
pub mod period;
pub mod server;
pub mod storage;
pub mod waiting;
pub mod webhooks;
