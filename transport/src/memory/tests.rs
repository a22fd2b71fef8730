use super::*;

fn arena(workers: usize, dims: &[usize], part_bytes: usize) -> Arena {
    Arena::new(workers, Parts::new(dims, part_bytes).unwrap()).unwrap()
}

fn sum(target: Update<'_>, grads: &[&[f32]]) {
    let add = |i: usize| grads.iter().map(|g| g[i]).sum::<f32>();
    match target {
        Update::InPlace(m) => m.iter_mut().enumerate().for_each(|(i, d)| *d += add(i)),
        Update::Into { next, model } => next
            .iter_mut()
            .enumerate()
            .for_each(|(i, d)| *d = model[i] + add(i)),
    }
}

#[test]
fn every_range_is_disjoint_aligned_and_worker_blocks_are_staggered() {
    for (dims, pb) in [
        (vec![1usize], 1024),
        (vec![1024], 4096),
        (vec![1000, 3, 4096], 1024),
    ] {
        let a = arena(4, &dims, pb);
        let mut ranges = Vec::new();
        for key in 0..a.parts().len() as Key {
            for v in [Version(0), Version(1)] {
                ranges.push(a.version_stamp(key, v));
                ranges.push(a.version_data(key, v));
            }
            for w in 0..4 {
                let r = a.slot_data(w, key);
                assert_eq!(r.start % 4, 0);
                assert_eq!(r.len(), a.parts()[key].bytes());
                ranges.push(r);
            }
        }
        let stride = a.worker_block(1).start - a.worker_block(0).start;
        assert!(
            !stride.is_multiple_of(PAGE),
            "stride {stride} aliases pages"
        );
        ranges.sort_by_key(|r| r.start);
        for pair in ranges.windows(2) {
            assert!(pair[0].end <= pair[1].start, "overlap {pair:?}");
        }
        assert!(ranges.last().unwrap().end <= a.len());
    }
}

#[test]
fn slots_change_hands_explicitly() {
    let mut a = arena(2, &[5, 7], 1024);
    assert!(a.gradient(1, 1).is_none(), "a lent slot cannot be read");
    a.receive_into(1, 1)
        .unwrap()
        .copy_from_slice(bytemuck::cast_slice(&[1.0f32; 7]));
    a.hand_over(1, 1, 3).unwrap();
    assert_eq!(a.slot_state(1, 1), SlotState::Held { clock: 3 });
    assert!(
        a.receive_into(1, 1).is_none(),
        "a held slot cannot be received into"
    );
    assert_eq!(
        a.hand_over(1, 1, 4),
        Err(ArenaError::SlotHeld { rank: 1, key: 1 })
    );
    assert_eq!(a.gradient(1, 1).unwrap(), &[1.0; 7]);
    for (w, k) in [(0, 0), (1, 0), (0, 1)] {
        assert_eq!(a.slot_state(w, k), SlotState::Lent);
    }
    a.lend(1, 1);
    assert!(a.gradient(1, 1).is_none());
    a.hand_over(0, 0, 0).unwrap();
    a.reset_worker(0);
    assert_eq!(a.slot_state(0, 0), SlotState::Lent);
}

#[test]
fn an_update_goes_in_place_when_nothing_reads_the_model() {
    let mut a = arena(1, &[4], 1024);
    a.receive_into(0, 0)
        .unwrap()
        .copy_from_slice(bytemuck::cast_slice(&[1.0f32; 4]));
    a.hand_over(0, 0, 0).unwrap();
    let mut in_place = false;
    let round = a.update(0, &[0], |t, g| {
        in_place = matches!(t, Update::InPlace(_));
        sum(t, g)
    });
    assert_eq!(round, Ok(1));
    assert!(in_place);
    assert_eq!((a.current(0), a.model(0)), (Version(0), &[1.0f32; 4][..]));
}

#[test]
fn an_update_writes_the_other_version_and_never_one_being_sent() {
    let mut a = arena(2, &[4], 1024);
    for (w, v) in [(0, 1.0f32), (1, 2.0)] {
        a.receive_into(w, 0)
            .unwrap()
            .copy_from_slice(bytemuck::cast_slice(&[v; 4]));
        a.hand_over(w, 0, 0).unwrap();
    }
    let (sent, round) = a.start_send(0);
    assert_eq!((sent, round), (Version(0), 0));
    assert_eq!(a.update(0, &[0, 1], sum), Ok(1));
    assert_eq!(a.model(0), &[3.0; 4]);
    assert_eq!(a.round(0), 1);
    // The version being sent is untouched.
    assert_eq!(a.version_bytes(0, sent), &[0u8; 16]);
    // With both versions being sent, the next update is refused until the older send ends.
    let (newer, _) = a.start_send(0);
    assert_eq!(
        a.update(0, &[0], sum),
        Err(ArenaError::VersionBusy {
            key: 0,
            version: sent
        })
    );
    a.end_send(0, newer);
    assert_eq!(a.model(0), &[3.0; 4], "a refused update changes nothing");
    a.end_send(0, sent);
    assert_eq!(a.update(0, &[0], sum), Ok(2));
    assert_eq!(a.model(0), &[4.0; 4]);
    let stamp = a.version_stamp(0, a.current(0));
    // SAFETY (test): nothing else borrows the arena.
    let bytes = unsafe { a.bytes(stamp) };
    assert_eq!(bytes, &2u64.to_le_bytes(), "the stamp carries the round");
}

#[test]
#[should_panic(expected = "not held")]
fn summing_a_slot_that_was_not_handed_over_panics() {
    let mut a = arena(2, &[4], 1024);
    let _ = a.update(0, &[1], sum);
}
