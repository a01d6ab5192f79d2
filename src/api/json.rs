//! Repeated keys in a JSON body. serde keeps the last of a repeated map key
//! (`amounts`, `attributes`) and refuses a repeated field only where a struct
//! is decoded, so one walk over the body, before it is decoded, refuses a key
//! repeated in any object at any depth, naming it by its path. The decision
//! bodies (the hot path) skip that second parse: their maps decode through
//! [`unique_map`], which refuses a repeated key with the same message.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// What a repeated key is told, after its path.
pub(super) const TWICE: &str = "appears twice; give each key once";

/// `deserialize_with` for a map field: a JSON object whose keys must all
/// differ. The error is raised while the repeated key's value is read, so the
/// path names the key (`amounts.tokens: appears twice; …`).
pub(super) fn unique_map<'de, D, V>(d: D) -> Result<std::collections::BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: serde::Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);
    /// Fails on the value of a repeated key.
    struct Repeated;
    impl<'de> DeserializeSeed<'de> for Repeated {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
            Err(serde::de::Error::custom(TWICE))
        }
    }
    impl<'de, V: serde::Deserialize<'de>> Visitor<'de> for Unique<V> {
        type Value = std::collections::BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    map.next_value_seed(Repeated)?;
                    unreachable!("a repeated key's value always fails");
                }
                let value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(std::marker::PhantomData))
}

/// Keys an object may have before they are kept in a set.
const SMALL_OBJECT: usize = 16;

/// The path and message of the first key repeated within one object of
/// `body`, such as `amounts.tokens: appears twice …`; `None` when there is
/// none or the body is not JSON (decoding says what is wrong then).
pub(super) fn repeated_key(body: &[u8]) -> Option<String> {
    let mut walk = Walk::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    // A body that is not one JSON value is the decoder's to report.
    Node(&mut walk).deserialize(&mut de).ok()?;
    de.end().ok()?;
    walk.found
}

/// The state of one walk.
#[derive(Default)]
struct Walk<'de> {
    /// Keys of every open object, outermost first: only the current object's
    /// are compared, the others name the path.
    keys: Vec<Cow<'de, str>>,
    /// The path to the current value.
    path: Vec<Step>,
    /// The message, once a repeated key is found.
    found: Option<String>,
}

/// One step of a path.
#[derive(Clone, Copy)]
enum Step {
    /// The value of the key at this index of `Walk::keys`.
    Key(usize),
    /// The element at this index of an array.
    Index(usize),
}

impl Walk<'_> {
    /// `a.b[2].c` for the current path followed by `key`.
    fn name(&self, key: &str) -> String {
        let mut out = String::new();
        for step in &self.path {
            match *step {
                Step::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(&self.keys[k]);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
        out
    }
}

/// Visits one value.
struct Node<'a, 'de>(&'a mut Walk<'de>);

impl<'de> DeserializeSeed<'de> for Node<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let walk = self.0;
        let mut i = 0;
        loop {
            walk.path.push(Step::Index(i));
            let more = seq.next_element_seed(Node(&mut *walk))?;
            walk.path.pop();
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let walk = self.0;
        let start = walk.keys.len();
        // Small objects (all the API's) compare in place; a large one gets a
        // set, so that a body of many keys costs linear time, not quadratic.
        let mut large: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(Key)? {
            let own = &walk.keys[start..];
            let repeated = match &mut large {
                Some(set) => !set.insert(key.clone()),
                None if own.len() < SMALL_OBJECT => own.contains(&key),
                None => {
                    let set = large.insert(own.iter().cloned().collect());
                    !set.insert(key.clone())
                }
            };
            if repeated && walk.found.is_none() {
                walk.found = Some(format!("{}: {TWICE}", walk.name(&key)));
            }
            walk.keys.push(key);
            walk.path.push(Step::Key(walk.keys.len() - 1));
            map.next_value_seed(Node(&mut *walk))?;
            walk.path.pop();
        }
        walk.keys.truncate(start);
        Ok(())
    }
}

/// Reads an object key, borrowed from the body unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::repeated_key;

    #[test]
    fn a_repeated_key_is_named_by_its_path_at_any_depth() {
        let keys: Vec<String> = (0..100).map(|i| format!("\"k{i}\":0")).collect();
        let many_keys = format!("{{{},\"k7\":1}}", keys.join(","));
        let cases = [
            (r#"{"subject":"a","subject":"b"}"#, "subject"),
            (r#"{"subject":"a","amounts":{"tokens":1,"tokens":2}}"#, "amounts.tokens"),
            (r#"{"attributes":{"model":"x","model":"y"}}"#, "attributes.model"),
            (
                r#"{"operations":[{"op":"check"},{"amounts":{"t":1,"t":1}}]}"#,
                "operations[1].amounts.t",
            ),
            (r#"{"a":{"b":[[{"c":1,"c":2}]]}}"#, "a.b[0][0].c"),
            (many_keys.as_str(), "k7"),
            // The same key written with an escape is the same key.
            (r#"{"amounts":{"tokens":1,"tok\u0065ns":2}}"#, "amounts.tokens"),
        ];
        for (body, path) in cases {
            assert_eq!(
                repeated_key(body.as_bytes()),
                Some(format!("{path}: appears twice; give each key once")),
                "{body}"
            );
        }
    }

    #[test]
    fn equal_keys_in_different_objects_are_not_repeats() {
        for body in [
            r#"{"subject":"a","amounts":{"subject":1},"attributes":{"subject":"x"}}"#,
            r#"{"operations":[{"op":"check","subject":"a"},{"op":"check","subject":"b"}]}"#,
            r#"{"a":{"x":1},"b":{"x":1}}"#,
            "not json",
            r#"{"a":1,"a""#,
            "",
        ] {
            assert_eq!(repeated_key(body.as_bytes()), None, "{body}");
        }
    }
}
