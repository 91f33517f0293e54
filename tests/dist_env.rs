//! Which launcher started this process, read from the environment: torchrun / `fabric run`
//! variables, and SLURM's as Lightning's `SLURMEnvironment` reads them (the root node of a
//! node list is compared with Lightning's own `resolve_root_node_address`, live).
mod common;

use std::collections::HashMap;
use tch_fabric::{dist::DistEnv, Error};

fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, Error> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    DistEnv::from_vars(|k| map.get(k).cloned())
}

fn slurm(rank: &str, extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, String)> {
    let mut v: Vec<(&str, String)> = vec![
        ("SLURM_NTASKS", "4".into()),
        ("SLURM_NTASKS_PER_NODE", "2".into()),
        ("SLURM_PROCID", rank.into()),
        (
            "SLURM_LOCALID",
            (rank.parse::<usize>().unwrap() % 2).to_string(),
        ),
        (
            "SLURM_NODEID",
            (rank.parse::<usize>().unwrap() / 2).to_string(),
        ),
        ("SLURM_JOB_NAME", "train".into()),
        ("SLURM_JOB_ID", "4242917".into()),
        ("SLURM_NODELIST", "gpu[07-08]".into()),
    ];
    for (k, x) in extra {
        v.retain(|(n, _)| n != k);
        v.push((k, x.to_string()));
    }
    v
}

fn read(vars: &[(&str, String)]) -> Result<Option<DistEnv>, Error> {
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env(&pairs)
}

#[test]
fn slurm_tasks_are_ranks_as_lightning_reads_them() {
    let e = read(&slurm("3", &[])).unwrap().unwrap();
    assert_eq!((e.rank, e.local_rank, e.world_size), (3, 1, 4));
    assert_eq!(e.master_addr, "gpu07");
    assert_eq!(
        e.master_port,
        15000 + 2917,
        "15000 + the job id's last four digits"
    );
    let e = read(&slurm(
        "0",
        &[("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")],
    ))
    .unwrap()
    .unwrap();
    assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.1", 29500));
    let mut no_job = slurm("1", &[]);
    no_job.retain(|(k, _)| *k != "SLURM_JOB_ID" && *k != "SLURM_NODELIST");
    let e = read(&no_job).unwrap().unwrap();
    assert_eq!(
        (e.master_addr.as_str(), e.master_port),
        ("127.0.0.1", 12910)
    );
}

#[test]
fn interactive_allocations_and_explicit_world_sizes_are_not_slurm_ranks() {
    for name in ["bash", "interactive"] {
        assert_eq!(
            read(&slurm("2", &[("SLURM_JOB_NAME", name)])).unwrap(),
            None
        );
    }
    // `fabric run` or torchrun inside an sbatch job: their variables win.
    let mut v = slurm("3", &[]);
    v.extend([
        ("WORLD_SIZE", "2".to_string()),
        ("RANK", "1".into()),
        ("MASTER_PORT", "29400".into()),
    ]);
    let e = read(&v).unwrap().unwrap();
    assert_eq!((e.rank, e.world_size, e.master_port), (1, 2, 29400));
}

#[test]
fn bad_slurm_variables_are_clear_errors() {
    let mut v = slurm("1", &[]);
    v.retain(|(k, _)| *k != "SLURM_NTASKS_PER_NODE");
    match read(&v) {
        Err(Error::Distributed(m)) => assert!(m.contains("--ntasks-per-node=4"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut v = slurm("1", &[]);
    v.retain(|(k, _)| *k != "SLURM_PROCID");
    match read(&v) {
        Err(Error::Distributed(m)) => assert!(m.contains("SLURM_PROCID"), "{m}"),
        other => panic!("{other:?}"),
    }
    for (k, bad) in [
        ("SLURM_PROCID", "4"),
        ("SLURM_PROCID", "x"),
        ("SLURM_NTASKS", "0"),
        ("SLURM_JOB_ID", "job"),
        ("MASTER_PORT", "70000"),
    ] {
        assert!(
            matches!(read(&slurm("1", &[(k, bad)])), Err(Error::Distributed(_))),
            "{k}={bad}"
        );
    }
}

#[test]
fn the_root_node_is_lightnings() {
    let lists = [
        "gpu[07-08]",
        "node[03-05,07],gpu1",
        "host7",
        "host[7]",
        "a[7],b[1-2]",
        "n[1],m",
        "first second",
        "127.0.0.1",
        "x[1-2]y[3]",
    ];
    let code = r#"
import json, sys
from lightning.fabric.plugins.environments import SLURMEnvironment
print(json.dumps([SLURMEnvironment.resolve_root_node_address(s) for s in json.loads(sys.stdin.read())]))
"#;
    let want: Vec<String> = serde_json::from_str(
        common::run_python(code, &serde_json::to_string(&lists).unwrap()).trim(),
    )
    .unwrap();
    for (list, want) in lists.iter().zip(want) {
        let e = read(&slurm("0", &[("SLURM_NODELIST", list)]))
            .unwrap()
            .unwrap();
        let got = if list.is_empty() {
            ""
        } else {
            e.master_addr.as_str()
        };
        assert_eq!(got, want, "SLURM_NODELIST={list:?}");
    }
}
