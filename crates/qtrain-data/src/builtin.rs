//! `builtin:instructions`, the embedded default dataset: short algorithmic
//! instructions with one right answer, which a tiny model (2 layers, hidden 64-128)
//! learns visibly within minutes on a CPU: the eval loss falls and its answers become
//! right. Four tasks, mixed evenly:
//!
//! * `Reverse the word: cat` → `tac`
//! * `What is 3 + 4?` → `7` (single digits: learnable, checkable at a glance)
//! * `Sort these letters: d b a` → `a b d`
//! * `Uppercase: hello` → `HELLO`
//!
//! Example `i` is generated from a ChaCha RNG seeded by `i` alone, so any example can
//! be produced on its own (the reader seeks by row like in a Parquet file) and the
//! dataset is identical on every machine. Each rendered example is well under 64
//! tokens with the built-in tokenizer.

use crate::util::hash_all;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Number of examples.
pub const BUILTIN_LEN: u64 = 4000;

/// The stream the examples are drawn from; change it and the dataset changes.
const DATASET_SEED: u64 = 0x7174_7261_696e_2d31;

const WORDS: [&str; 96] = [
    "cat", "dog", "sun", "map", "cup", "hat", "pen", "box", "red", "top", "bed", "bus", "car",
    "egg", "fox", "fun", "gum", "hen", "ink", "jam", "key", "leg", "man", "net", "owl", "pig",
    "rat", "sky", "toy", "van", "web", "yak", "zip", "arm", "bag", "bin", "art", "ant", "bird",
    "fish", "tree", "milk", "book", "star", "moon", "rain", "snow", "wind", "frog", "duck", "lamp",
    "door", "desk", "ship", "road", "rock", "sand", "leaf", "seed", "king", "ring", "song", "word",
    "line", "time", "game", "cake", "rose", "wolf", "bear", "lion", "goat", "apple", "house",
    "water", "light", "plant", "train", "bread", "chair", "table", "smile", "cloud", "river",
    "stone", "grass", "music", "horse", "mouse", "tiger", "zebra", "robot", "happy", "green",
    "lemon", "piano",
];

/// The kinds of task, in the order `example` cycles through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Reverse,
    Add,
    Sort,
    Uppercase,
}

/// Example `index`: `(task, prompt, answer)`. Indices past [`BUILTIN_LEN`] are valid
/// too (a longer stream of the same distribution).
pub fn example(index: u64) -> (Task, String, String) {
    let mut rng = ChaCha8Rng::seed_from_u64(hash_all(&[DATASET_SEED, index]));
    match index % 4 {
        0 => {
            let w = WORDS[rng.random_range(0..WORDS.len())];
            (
                Task::Reverse,
                format!("Reverse the word: {w}"),
                w.chars().rev().collect(),
            )
        }
        1 => {
            let a = rng.random_range(0..10u32);
            let b = rng.random_range(0..10u32);
            (
                Task::Add,
                format!("What is {a} + {b}?"),
                (a + b).to_string(),
            )
        }
        2 => {
            // Three distinct letters.
            let mut letters: Vec<char> = Vec::with_capacity(3);
            while letters.len() < 3 {
                let c = (b'a' + rng.random_range(0..26u8)) as char;
                if !letters.contains(&c) {
                    letters.push(c);
                }
            }
            let shown: Vec<String> = letters.iter().map(char::to_string).collect();
            letters.sort_unstable();
            let sorted: Vec<String> = letters.iter().map(char::to_string).collect();
            (
                Task::Sort,
                format!("Sort these letters: {}", shown.join(" ")),
                sorted.join(" "),
            )
        }
        _ => {
            let w = WORDS[rng.random_range(0..WORDS.len())];
            (
                Task::Uppercase,
                format!("Uppercase: {w}"),
                w.to_ascii_uppercase(),
            )
        }
    }
}

/// Example `index` as a record in `messages` format, as a file would hold it.
pub fn record(index: u64) -> serde_json::Value {
    let (_, prompt, answer) = example(index);
    serde_json::json!({
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::Encoder;
    use crate::format::Sample;
    use crate::template::Message;

    #[test]
    fn answers_are_correct_and_deterministic() {
        for i in 0..400 {
            let (task, prompt, answer) = example(i);
            assert_eq!(example(i), (task, prompt.clone(), answer.clone()));
            let arg = prompt.rsplit_once(": ").map(|(_, a)| a.to_string());
            match task {
                Task::Reverse => assert_eq!(answer, arg.unwrap().chars().rev().collect::<String>()),
                Task::Uppercase => assert_eq!(answer, arg.unwrap().to_uppercase()),
                Task::Sort => {
                    let mut l: Vec<&str> = arg.as_deref().unwrap().split(' ').collect();
                    l.sort();
                    assert_eq!(answer, l.join(" "));
                }
                Task::Add => {
                    let nums: Vec<u32> = prompt
                        .trim_start_matches("What is ")
                        .trim_end_matches('?')
                        .split(" + ")
                        .map(|n| n.parse().unwrap())
                        .collect();
                    assert_eq!(answer, (nums[0] + nums[1]).to_string());
                }
            }
        }
        assert_eq!(example(0).1, example(0).1);
        assert_ne!(
            example(0),
            example(4),
            "different indices give different examples"
        );
    }

    #[test]
    fn examples_are_short_and_varied() {
        let enc = Encoder::tiny();
        let mut distinct = std::collections::HashSet::new();
        for i in 0..BUILTIN_LEN {
            let (_, p, a) = example(i);
            distinct.insert(p.clone());
            if i % 10 == 0 {
                let s = Sample::Chat(vec![Message::user(p), Message::assistant(a)]);
                let t = enc.encode(&s, false).unwrap().tokens;
                assert!(t.len() < 64, "example {i} has {} tokens", t.len());
                assert!(t.trainable() >= 2, "answer and EOS are trained");
            }
        }
        assert!(
            distinct.len() > 700,
            "only {} distinct prompts",
            distinct.len()
        );
    }
}
