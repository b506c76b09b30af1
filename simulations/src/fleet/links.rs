//! The random gossip meshes of a simulated fleet: links added at random until every node
//! has its degree, and thinned where both ends have more.

use super::SimNode;
use crate::engine::Rng;

/// Adds random links both ways until every node has `degree` in the list `links` picks
/// (a few end with one or two more).
pub(super) fn random_links(
    nodes: &mut [SimNode],
    degree: usize,
    rng: &mut Rng,
    links: impl Fn(&mut SimNode) -> &mut Vec<usize>,
) {
    let n = nodes.len();
    for i in 0..n {
        let mut tries = 0;
        while links(&mut nodes[i]).len() < degree && tries < 100 {
            tries += 1;
            let j = rng.below(n);
            if j != i && links(&mut nodes[j]).len() < degree && !links(&mut nodes[i]).contains(&j) {
                links(&mut nodes[i]).push(j);
                links(&mut nodes[j]).push(i);
            }
        }
    }
    // The last nodes may find every other node full (at 3,000 nodes one was left with no
    // link at all, and never heard of anything): they link to any node, which may then
    // hold a link more than `degree` (gossipsub's meshes vary by as much).
    for i in 0..n {
        let mut tries = 0;
        while links(&mut nodes[i]).len() < degree.min(n.saturating_sub(1)) && tries < 1000 {
            tries += 1;
            let j = rng.below(n);
            if j != i && !links(&mut nodes[i]).contains(&j) {
                links(&mut nodes[i]).push(j);
                links(&mut nodes[j]).push(i);
            }
        }
    }
}

/// Removes links both ways between nodes that both hold more than `degree` in the list
/// `links` picks, until few do (a greedy matching: a few nodes keep one link more, as
/// gossipsub's meshes vary).
pub(super) fn thin_links(nodes: &mut [SimNode], degree: usize, links: impl Fn(&mut SimNode) -> &mut Vec<usize>) {
    for i in 0..nodes.len() {
        let mut k = 0;
        while links(&mut nodes[i]).len() > degree && k < links(&mut nodes[i]).len() {
            let j = links(&mut nodes[i])[k];
            if links(&mut nodes[j]).len() > degree {
                links(&mut nodes[i]).remove(k);
                links(&mut nodes[j]).retain(|x| *x != i);
            } else {
                k += 1;
            }
        }
    }
}
