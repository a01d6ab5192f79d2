//! Usage per attribute value (`history.dimensions`): how a charge's values
//! of those attributes are written into usage buckets and kept on a
//! reservation until its commit, and how they are read back.
//!
//! Both ride in existing maps of metric → amount, under keys no metric can
//! have (they contain a control character, which names and attribute
//! values never do), so records and snapshots keep their format:
//! - a usage bucket holds `metric␟dimension␟value` → amount beside the
//!   plain `metric` → amount (the plain amount stays the total);
//! - a reservation's amounts hold `␟dimension␟value` → 0.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::state::intern;

/// The separator (U+001F, the unit separator).
const SEP: char = '\u{1f}';

/// A request's values of the dimensions: the ones it carries, in order.
pub fn values<'a>(dimensions: &'a [Arc<str>], attributes: &'a BTreeMap<String, String>) -> Vec<(&'a str, &'a str)> {
    dimensions
        .iter()
        .filter_map(|d| attributes.get(&**d).map(|v| (&**d, v.as_str())))
        .collect()
}

/// `usage` with each metric's amount also filed under each dimension value.
pub fn with_values(mut usage: Vec<(Arc<str>, u64)>, values: &[(&str, &str)]) -> Vec<(Arc<str>, u64)> {
    if values.is_empty() {
        return usage;
    }
    thread_local! {
        /// The name being built: most are interned already, so most calls
        /// allocate nothing.
        static NAME: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    let plain = usage.len();
    NAME.with_borrow_mut(|name| {
        for i in 0..plain {
            let (metric, amount) = usage[i].clone();
            for (d, v) in values {
                name.clear();
                name.push_str(&metric);
                name.push(SEP);
                name.push_str(d);
                name.push(SEP);
                name.push_str(v);
                usage.push((intern(name), amount));
            }
        }
    });
    usage
}

/// Splits a bucket key: `None` for a plain metric, else (metric, dimension, value).
pub fn split_usage_key(key: &str) -> Option<(&str, &str, &str)> {
    let (metric, rest) = key.split_once(SEP)?;
    let (dimension, value) = rest.split_once(SEP)?;
    Some((metric, dimension, value))
}

/// Marks `amounts` (a reservation's) with the request's dimension values.
pub fn mark_reservation(amounts: &mut BTreeMap<String, u64>, values: &[(&str, &str)]) {
    for (d, v) in values {
        amounts.insert(format!("{SEP}{d}{SEP}{v}"), 0);
    }
}

/// A reservation's amounts without the marks: what was asked for.
pub fn requested(amounts: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    if !amounts.keys().any(|k| k.starts_with(SEP)) {
        return amounts.clone();
    }
    amounts
        .iter()
        .filter(|(k, _)| !k.starts_with(SEP))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// A reservation's dimension values, from its marks.
pub fn marked(amounts: &BTreeMap<String, u64>) -> Vec<(&str, &str)> {
    amounts
        .keys()
        .filter_map(|k| k.strip_prefix(SEP)?.split_once(SEP))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_ride_in_metric_maps_and_come_back() {
        let dims: Vec<Arc<str>> = vec!["model".into(), "region".into()];
        let attrs: BTreeMap<String, String> = [("model".to_string(), "gpt-4o".to_string())].into();
        let v = values(&dims, &attrs);
        assert_eq!(v, [("model", "gpt-4o")]);
        let usage = with_values(vec![("tokens".into(), 10), ("requests".into(), 1)], &v);
        let keys: Vec<(&str, u64)> = usage.iter().map(|(k, a)| (&**k, *a)).collect();
        assert_eq!(keys.len(), 4);
        assert_eq!(split_usage_key(keys[2].0), Some(("tokens", "model", "gpt-4o")));
        assert_eq!(split_usage_key("tokens"), None);

        let mut amounts: BTreeMap<String, u64> = [("tokens".to_string(), 5)].into();
        mark_reservation(&mut amounts, &v);
        assert_eq!(marked(&amounts), [("model", "gpt-4o")]);
        assert_eq!(requested(&amounts), [("tokens".to_string(), 5)].into());
    }
}
