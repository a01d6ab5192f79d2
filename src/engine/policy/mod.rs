//! The policy: what decides. [`doc`] is the policy as written (TOML file, API
//! JSON, WAL records), [`compile`] checks it and turns it into the [`Policy`]
//! decisions read, [`versions`] keeps its numbered versions and says what a
//! change does to live counters.

mod compile;
mod doc;
mod versions;

pub use compile::*;
pub use doc::*;
pub use versions::*;
