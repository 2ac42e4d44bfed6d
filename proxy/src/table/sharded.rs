//! A hash map split into a fixed number of copy-on-write shards, so that a changed copy of a
//! large map costs one shard instead of the whole map.
//!
//! Cloning a [`ShardedMap`] copies only its array of shard pointers. Changing the clone copies the
//! one shard that the key hashes to, if that shard is still shared with another clone. The
//! routing table keeps every snapshot immutable this way and still changes one function at about
//! `len / SHARDS` entries' cost.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

/// Number of shards in every map. With 64 shards, adding one function to a table of 100k functions
/// copies about 1,600 entries of the map of all versions (pointer copies and reference count
/// increments), and cloning a map copies 64 pointers.
pub(super) const SHARDS: usize = 64;

/// An entry with the full hash of its key. Growing a shard never hashes keys again, and a probe
/// compares the hash before it calls the key predicate, which usually reads memory elsewhere.
#[derive(Debug, Clone)]
struct Slot<T> {
    hash: u64,
    value: T,
}

type Shard<T> = HashTable<Slot<T>>;

/// A hash map of values that contain their own keys. Callers hash a key with [`Self::hash`] and
/// pass that hash together with a predicate that matches the key, as with [`HashTable`].
#[derive(Debug, Clone)]
pub(super) struct ShardedMap<T> {
    /// foldhash hashes the table's short keys (namespaces, names, qualifiers) about four times
    /// faster than std's SipHash, which matters on every request and when a table of many
    /// functions is built. Its seed is random per process and per map, which foldhash 0.2
    /// describes as minimally resistant to collision attacks on names that tenants choose.
    state: foldhash::fast::RandomState,
    shards: Box<[Arc<Shard<T>>]>,
    len: usize,
}

impl<T> Default for ShardedMap<T> {
    fn default() -> Self {
        // Every shard starts as the same empty table, and the first insert into a shard copies it.
        let empty = Arc::new(HashTable::new());
        ShardedMap {
            state: foldhash::fast::RandomState::default(),
            shards: (0..SHARDS).map(|_| Arc::clone(&empty)).collect(),
            len: 0,
        }
    }
}

/// Picks the shard of a hash. hashbrown places entries by the low bits of the hash and tags them
/// with the top 7 bits, so the shard index comes from bits in between, and the entries of one
/// shard still differ in both.
fn shard_index(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

impl<T: Clone> ShardedMap<T> {
    /// Hashes a key with this map's seed.
    pub(super) fn hash<K: Hash + ?Sized>(&self, key: &K) -> u64 {
        self.state.hash_one(key)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn get(&self, hash: u64, mut matches: impl FnMut(&T) -> bool) -> Option<&T> {
        self.shards[shard_index(hash)]
            .find(hash, |slot| slot.hash == hash && matches(&slot.value))
            .map(|slot| &slot.value)
    }

    /// Returns the value for a mutable change. Copies the value's shard first if another clone
    /// of the map shares it, but not when the key is absent.
    pub(super) fn get_mut(
        &mut self,
        hash: u64,
        mut matches: impl FnMut(&T) -> bool,
    ) -> Option<&mut T> {
        let shard = &mut self.shards[shard_index(hash)];
        // A shard that no other clone shares needs one probe. A shared one is probed before it is
        // copied.
        if Arc::get_mut(shard).is_none() {
            shard.find(hash, |slot| slot.hash == hash && matches(&slot.value))?;
        }
        Arc::make_mut(shard)
            .find_mut(hash, |slot| slot.hash == hash && matches(&slot.value))
            .map(|slot| &mut slot.value)
    }

    /// Changes the value that `matches` selects with `change`, or inserts the value that `create`
    /// returns when there is none, in one probe. Returns the changed or inserted value.
    pub(super) fn change_or_insert(
        &mut self,
        hash: u64,
        mut matches: impl FnMut(&T) -> bool,
        change: impl FnOnce(&mut T),
        create: impl FnOnce() -> T,
    ) -> &mut T {
        let shard = Arc::make_mut(&mut self.shards[shard_index(hash)]);
        match shard.entry(
            hash,
            |slot| slot.hash == hash && matches(&slot.value),
            |slot| slot.hash,
        ) {
            Entry::Occupied(occupied) => {
                let value = &mut occupied.into_mut().value;
                change(value);
                value
            }
            Entry::Vacant(vacant) => {
                self.len += 1;
                let slot = Slot {
                    hash,
                    value: create(),
                };
                &mut vacant.insert(slot).into_mut().value
            }
        }
    }

    /// Inserts a value, replacing and returning the value that `matches` selects.
    pub(super) fn insert(
        &mut self,
        hash: u64,
        value: T,
        mut matches: impl FnMut(&T) -> bool,
    ) -> Option<T> {
        let shard = Arc::make_mut(&mut self.shards[shard_index(hash)]);
        match shard.entry(
            hash,
            |slot| slot.hash == hash && matches(&slot.value),
            |slot| slot.hash,
        ) {
            Entry::Occupied(mut occupied) => {
                Some(std::mem::replace(&mut occupied.get_mut().value, value))
            }
            Entry::Vacant(vacant) => {
                vacant.insert(Slot { hash, value });
                self.len += 1;
                None
            }
        }
    }

    /// Removes and returns the value that `matches` selects. Copies the value's shard first if
    /// another clone of the map shares it, but not when the key is absent.
    pub(super) fn remove(&mut self, hash: u64, mut matches: impl FnMut(&T) -> bool) -> Option<T> {
        let shard = &mut self.shards[shard_index(hash)];
        if Arc::get_mut(shard).is_none() {
            shard.find(hash, |slot| slot.hash == hash && matches(&slot.value))?;
        }
        let occupied = Arc::make_mut(shard)
            .find_entry(hash, |slot| slot.hash == hash && matches(&slot.value))
            .ok()?;
        let (slot, _) = occupied.remove();
        self.len -= 1;
        Some(slot.value)
    }

    /// Returns every value, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &T> {
        self.shards
            .iter()
            .flat_map(|shard| shard.iter())
            .map(|slot| &slot.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(map: &mut ShardedMap<(u32, &'static str)>, key: u32, value: &'static str) {
        let hash = map.hash(&key);
        map.insert(hash, (key, value), |entry| entry.0 == key);
    }

    fn get(map: &ShardedMap<(u32, &'static str)>, key: u32) -> Option<&'static str> {
        map.get(map.hash(&key), |entry| entry.0 == key)
            .map(|entry| entry.1)
    }

    #[test]
    fn clone_shares_untouched_shards() {
        let mut map = ShardedMap::default();
        for key in 0..1_000 {
            insert(&mut map, key, "old");
        }
        let mut changed = map.clone();
        insert(&mut changed, 7, "new");

        let shared = map
            .shards
            .iter()
            .zip(changed.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert_eq!(shared, SHARDS - 1, "more than one shard was copied");
        assert_eq!(get(&map, 7), Some("old"));
        assert_eq!(get(&changed, 7), Some("new"));
        assert_eq!(changed.len(), 1_000);
    }

    #[test]
    fn remove_of_absent_key_copies_nothing() {
        let mut map = ShardedMap::default();
        insert(&mut map, 1, "one");
        let mut changed = map.clone();
        let hash = changed.hash(&2u32);
        assert!(changed.remove(hash, |entry| entry.0 == 2).is_none());
        assert!(changed.get_mut(hash, |entry| entry.0 == 2).is_none());

        let all_shared = map
            .shards
            .iter()
            .zip(changed.shards.iter())
            .all(|(a, b)| Arc::ptr_eq(a, b));
        assert!(all_shared, "a shard was copied for an absent key");
        assert_eq!(changed.len(), 1);
    }

    #[test]
    fn insert_remove_and_values() {
        let mut map = ShardedMap::default();
        for key in 0..300 {
            insert(&mut map, key, "v");
        }
        assert_eq!(map.len(), 300);
        for key in (0..300).step_by(2) {
            let hash = map.hash(&key);
            assert_eq!(map.remove(hash, |entry| entry.0 == key), Some((key, "v")));
        }
        assert_eq!(map.len(), 150);
        let mut keys: Vec<u32> = map.values().map(|entry| entry.0).collect();
        keys.sort_unstable();
        let expected: Vec<u32> = (1..300).step_by(2).collect();
        assert_eq!(keys, expected);
        assert_eq!(get(&map, 2), None);
        assert_eq!(get(&map, 3), Some("v"));
    }
}
