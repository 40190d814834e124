#!/usr/bin/env python3
"""Checks of the peer benchmarks that need no GPU, torch or peer library.

    python3 scripts/test_bench_table.py [-v]

- argument parsing of peer_common / peer_qlora / peer_unsloth (cases, target sets,
  recipes and their run order, the offline environment Unsloth gets);
- bench_compare_table.py on synthetic result directories: qtrain lines with time
  stamps, peers that ran, ran out of memory or failed to import, nvidia-smi samples;
  the fastest and lowest-memory peer per case, qtrain's ratios, two directories
  merged, the Markdown table;
- scripts/bench-compare.sh end to end with a stand-in qtrain binary and nvidia-smi
  (shell scripts written here): on a machine without torch both peers must record
  their import failure for every case, the table must show it, and the script must
  still print qtrain's numbers and exit 1.
Not part of CI (CI is cargo's); run it after touching any of these scripts.
"""
import datetime
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_compare_table as bct  # noqa: E402
import peer_common as pc  # noqa: E402
import peer_qlora  # noqa: E402
import peer_unsloth  # noqa: E402

GIB = float(1 << 30)


def read(path):
    with open(path) as f:
        return f.read()


def smi_line(t, mib):
    return datetime.datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3] + f", {mib}\n"


def peer_rec(peer, case, targets, status="ok", tps=None, t0=0.0, t1=0.0, resv_gib=None, alloc_gib=None, losses=(2.0, 1.0), **kw):
    rec = {
        "peer": peer,
        "tool": "unsloth" if peer == "unsloth" else "hf",
        "recipe": peer.split("-", 1)[-1],
        "case": case,
        "targets": targets,
        "status": status,
        "tokens_per_s": tps,
        "step_s": (int(case.split("x")[0]) * int(case.split("x")[1]) / tps) if tps else None,
        "t_start": t0,
        "t_end": t1,
        "losses": list(losses) if status == "ok" else None,
        "loss_falls": (losses[-1] < losses[0]) if status == "ok" else None,
        "peak_memory_reserved_bytes": resv_gib * GIB if resv_gib is not None else None,
        "peak_memory_allocated_bytes": alloc_gib * GIB if alloc_gib is not None else None,
        "torch": "2.11.0",
        "transformers": "5.17.0",
        "peft": "0.21.2",
        "bitsandbytes": "0.50.2",
        "gpu": "NVIDIA H200",
    }
    rec.update(kw)
    return rec


QKVO = "q_proj,k_proj,v_proj,o_proj"


class ParsingTests(unittest.TestCase):
    def test_cases(self):
        self.assertEqual(pc.parse_cases("8x512, 4x2048,1x8192"), [("8x512", 8, 512), ("4x2048", 4, 2048), ("1x8192", 1, 8192)])
        for bad in ("8x", "x512", "8x1", "0x512", "8*512", ""):
            with self.assertRaises(SystemExit, msg=bad):
                pc.parse_cases(bad)

    def test_target_sets(self):
        self.assertEqual(pc.parse_target_set("qkvo"), ("qkvo", pc.PROJS[:4]))
        self.assertEqual(pc.parse_target_set("v_proj,q_proj,k_proj,o_proj"), ("qkvo", pc.PROJS[:4]))
        self.assertEqual(pc.parse_target_set(",".join(reversed(pc.PROJS))), ("all", pc.PROJS))
        self.assertEqual(pc.parse_target_set("q_proj,v_proj"), ("q_proj,v_proj", ["q_proj", "v_proj"]))
        with self.assertRaises(SystemExit):
            pc.parse_target_set("q_proj,w_proj")

    def test_recipes_run_in_a_fixed_order(self):
        def recipes(*argv):
            a = peer_qlora.args_parser().parse_args(["--model", "/m", *argv])
            return peer_qlora.parse_recipes(a)

        self.assertEqual(recipes(), (["autocast"], None))
        self.assertEqual(recipes("--recipe", "liger"), (["liger"], None))
        run, note = recipes("--recipes", "liger,plain,autocast")
        self.assertEqual(run, ["autocast", "plain", "liger"])
        self.assertIn("given liger,plain,autocast", note)
        self.assertEqual(recipes("--recipes", "autocast,liger")[0], ["autocast", "liger"])
        # the old spelling still works
        self.assertEqual(recipes("--autocast", "none"), (["plain"], None))
        self.assertEqual(recipes("--autocast", "bf16"), (["autocast"], None))
        with self.assertRaises(SystemExit):
            recipes("--recipes", "autocast,fast")
        with self.assertRaises(SystemExit):
            recipes("--recipe", "fast")

    def test_common_arguments(self):
        a = peer_qlora.args_parser().parse_args(
            ["--model", "/m", "--cases", "1x8192", "--targets", "qkvo", "all", "--warmup", "1", "--steps", "3"]
        )
        cases, sets, alpha = pc.check_common_args(a)
        self.assertEqual(cases, [("1x8192", 1, 8192)])
        self.assertEqual([s[0] for s in sets], ["qkvo", "all"])
        self.assertEqual(alpha, 32.0)
        a = peer_unsloth.args_parser().parse_args(["--model", "/m", "--steps", "0"])
        with self.assertRaises(SystemExit):
            pc.check_common_args(a)

    def test_unsloth_offline_environment(self):
        env = {"HF_HUB_OFFLINE": "0", "PATH": "/bin"}
        done = peer_unsloth.set_offline_env(env)
        # a value the caller set wins; everything else is set
        self.assertEqual(env["HF_HUB_OFFLINE"], "0")
        for k in ("TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS", "HF_HUB_DISABLE_TELEMETRY"):
            self.assertEqual(env[k], "1", k)
        self.assertTrue(env["UNSLOTH_COMPILE_LOCATION"].startswith("/tmp/"))
        self.assertEqual(done["HF_HUB_OFFLINE"], "0")

    def test_tflops_convention(self):
        shape = {"layers": 32, "heads": 32, "head_dim": 128, "matmul_params": 7.11e9}
        # 6P per token plus attention: 8x512 at 0.25 s
        t = pc.achieved_tflops(shape, 4096, 512, 0.25)
        attn = 2.0 * 32 * 512 * 32 * 128
        self.assertAlmostEqual(t, (6 * 7.11e9 + 4 * attn) * 4096 / 0.25 / 1e12)


class TableTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="bench-table-")

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def write(self, d, name, lines):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w") as f:
            f.writelines(lines)

    def make_run(self, d, t=1_700_000_000.0):
        # qtrain: two cases, a start stamp, a log line between the JSON lines
        self.write(d, "qtrain-qkvo.start", [f"{t}\n"])
        q1 = {"case": "8x512", "targets": QKVO, "tokens_per_s": 17000.0, "step_s": 0.241, "peak_device_mem_used_mib": 15000.0, "losses": [10.4, 9.9], "loss_falls": True}
        q2 = {"case": "1x8192", "targets": QKVO, "tokens_per_s": 10500.0, "step_s": 0.78, "peak_device_mem_used_mib": 24985.6, "losses": [10.4, 9.8], "loss_falls": True}
        self.write(d, "qtrain-qkvo.stamped", [f"{t + 20}\t{json.dumps(q1)}\n", f"{t + 21}\tnot json\n", f"{t + 30}\t{json.dumps(q2)}\n"])
        p = [
            peer_rec("hf-autocast", "8x512", QKVO, tps=7500.0, t0=t + 100, t1=t + 110, resv_gib=9.0, alloc_gib=8.6),
            peer_rec("hf-autocast", "1x8192", QKVO, tps=7200.0, t0=t + 110, t1=t + 120, resv_gib=13.0, alloc_gib=12.4),
            peer_rec("hf-liger", "8x512", QKVO, tps=9200.0, t0=t + 200, t1=t + 210, resv_gib=12.0, alloc_gib=11.4),
            peer_rec("hf-liger", "1x8192", QKVO, status="oom", t0=t + 210, t1=t + 215, resv_gib=140.0, error="CUDA out of memory. Tried to allocate 2 GiB"),
        ]
        self.write(d, "peer-hf.jsonl", [json.dumps(r) + "\n" for r in p] + ["Traceback (most recent call last):\n"])
        u = [
            peer_rec("unsloth", c, QKVO, status="error", error="import unsloth: ModuleNotFoundError: No module named 'unsloth'")
            for c in ("8x512", "1x8192")
        ]
        self.write(d, "peer-unsloth.jsonl", [json.dumps(r) + "\n" for r in u])
        # nvidia-smi: 9.5 GiB during hf-autocast 8x512, 14 GiB during its 1x8192; none
        # during hf-liger (its memory falls back to torch's reserved figure)
        smi = [smi_line(t + 101 + i * 0.1, 9728) for i in range(50)]
        smi += [smi_line(t + 111 + i * 0.1, 14336) for i in range(50)]
        self.write(d, "smi-peer-hf.csv", smi)
        self.write(d, "durations.tsv", ["qtrain-qkvo\t41.5\texit 0\n", "peer-hf(autocast,liger)\t201.0\texit 0\n"])

    def test_ratios_against_fastest_and_lowest_peer(self):
        d = os.path.join(self.tmp, "run")
        self.make_run(d)
        rows, order, envs, durations = bct.collect([d])
        self.assertEqual(order, [("qkvo", "8x512"), ("qkvo", "1x8192")])
        r = rows[("qkvo", "8x512")]
        self.assertEqual(r["fastest_peer"], {"name": "hf-liger", "tokens_per_s": 9200.0})
        # hf-autocast's smi peak (9.5 GiB) beats hf-liger's reserved 12 GiB
        self.assertEqual(r["lowest_memory_peer"]["name"], "hf-autocast")
        self.assertAlmostEqual(r["lowest_memory_peer"]["peak_gib"], 9.5)
        q = r["tools"]["qtrain"]
        self.assertAlmostEqual(q["speed_ratio"], 17000 / 9200)
        self.assertAlmostEqual(q["memory_ratio"], (15000 / 1024) / 9.5)
        self.assertEqual(r["tools"]["hf-liger"]["peak_src"], "reserved")
        self.assertEqual(r["tools"]["unsloth"]["status"], "error")
        self.assertIsNone(r["tools"]["unsloth"]["tokens_per_s"])
        # 1x8192: hf-liger ran out of memory, so the fastest peer is hf-autocast
        r = rows[("qkvo", "1x8192")]
        self.assertEqual(r["fastest_peer"]["name"], "hf-autocast")
        self.assertAlmostEqual(r["tools"]["qtrain"]["speed_ratio"], 10500 / 7200)
        self.assertEqual(r["tools"]["hf-liger"]["status"], "oom")
        self.assertIsNone(r["tools"]["hf-liger"]["peak_gib"])
        self.assertAlmostEqual(r["lowest_memory_peer"]["peak_gib"], 14.0)
        self.assertEqual(len(durations), 2)

    def test_rendered_table_names_every_failure(self):
        d = os.path.join(self.tmp, "run")
        self.make_run(d)
        text = bct.render_text(*bct.collect([d]))
        self.assertIn("OOM: CUDA out of memory", text)
        self.assertIn("ERROR: import unsloth: ModuleNotFoundError", text)
        self.assertIn("hf-liger 9200", text)
        self.assertIn(f"{17000 / 9200:.2f}x", text)
        self.assertIn("phases (bench-compare.sh): qtrain-qkvo 41.5s exit 0", text)
        md = bct.render_markdown(*bct.collect([d])[:2])
        lines = md.splitlines()
        self.assertTrue(lines[0].startswith("| targets | case | qtrain tok/s / GiB | hf-autocast tok/s / GiB | hf-liger"))
        self.assertIn("| qkvo | 1 x 8192 | 10,500 / 24.4 | 7,200 / 14.0 | OOM | ERROR | hf-autocast | **1.46x** |", md)

    def test_two_directories_merge_and_missing_results_show(self):
        d1, d2 = os.path.join(self.tmp, "a"), os.path.join(self.tmp, "b")
        self.make_run(d1)
        # the second command: Unsloth alone, which ran this time, one case only
        self.write(d2, "peer-unsloth.jsonl", [json.dumps(peer_rec("unsloth", "8x512", QKVO, tps=12000.0, resv_gib=7.0)) + "\n"])
        os.remove(os.path.join(d1, "peer-unsloth.jsonl"))
        rows, order, envs, _ = bct.collect([d1, d2])
        r = rows[("qkvo", "8x512")]
        self.assertEqual(r["fastest_peer"]["name"], "unsloth")
        self.assertEqual(r["lowest_memory_peer"], {"name": "unsloth", "peak_gib": 7.0})
        self.assertAlmostEqual(r["tools"]["qtrain"]["speed_ratio"], 17000 / 12000)
        text = bct.render_text(rows, order, envs, [])
        # unsloth has no 1x8192 line in either directory
        self.assertRegex(text, r"unsloth +- +- +- +- +- +- +- +- +-  NO RESULT")

    def test_old_peer_lines_and_variants(self):
        d = os.path.join(self.tmp, "old")
        old = peer_rec("x", "8x512", QKVO, tps=5600.0, resv_gib=10.1)
        del old["peer"], old["tool"], old["recipe"]
        old["autocast"] = "none"
        self.write(d, "peer.jsonl", [json.dumps(old) + "\n"])
        t = 1_700_000_000.0
        for v, tps, mib in (("qtrain", 17418.0, 15186.0), ("qtrain-lowmem", 13690.0, 7270.0)):
            rec = {"case": "8x512", "targets": QKVO, "tokens_per_s": tps, "peak_device_mem_used_mib": mib}
            self.write(d, f"{v}-qkvo.stamped", [f"{t}\t{json.dumps(rec)}\n"])
        rows, order, _, _ = bct.collect([d])
        r = rows[("qkvo", "8x512")]
        self.assertEqual(sorted(r["tools"]), ["hf-plain", "qtrain", "qtrain-lowmem"])
        self.assertAlmostEqual(r["tools"]["qtrain-lowmem"]["speed_ratio"], 13690 / 5600)
        self.assertAlmostEqual(r["tools"]["qtrain-lowmem"]["memory_ratio"], (7270 / 1024) / 10.1)

    def test_clocks_and_power_per_tool(self):
        # Six-column samples (bench-compare.sh since v12): qtrain's 8x512 window holds
        # two busy samples at the power cap and one idle sample (ignored); hf-autocast's
        # 8x512 window one busy sample without a limit and one with the HW power brake.
        d = os.path.join(self.tmp, "clk")
        self.make_run(d)
        t = 1_700_000_000.0

        def line(ts, mib, util, mhz, watts, reasons):
            return smi_line(ts, mib).rstrip("\n") + f", {util}, {mhz}, {watts}, {reasons}\n"

        self.write(d, "smi-qtrain-qkvo.csv", [
            line(t + 5, 1000, 0, 345, 80.0, "0x0000000000000001"),
            line(t + 10, 15000, 100, 1600, 690.0, "0x0000000000000004"),
            line(t + 11, 15000, 98, 1500, 700.0, "0x0000000000000004"),
        ])
        self.write(d, "smi-peer-hf.csv", [
            line(t + 101, 9728, 100, 1980, 500.0, "0x0000000000000000"),
            line(t + 102, 9728, 100, 1700, 650.0, "0x0000000000000080"),
        ])
        rows, order, envs, durations = bct.collect([d])
        q = rows[("qkvo", "8x512")]["tools"]["qtrain"]
        self.assertAlmostEqual(q["sm_mhz"], 1550.0)
        self.assertAlmostEqual(q["power_w"], 695.0)
        self.assertAlmostEqual(q["power_limited"], 1.0)
        self.assertAlmostEqual(q["smi_gib"], 15000 / 1024)
        h = rows[("qkvo", "8x512")]["tools"]["hf-autocast"]
        self.assertAlmostEqual(h["sm_mhz"], 1840.0)
        self.assertAlmostEqual(h["power_limited"], 0.5)
        self.assertAlmostEqual(h["peak_gib"], 9.5)
        # no samples in qtrain's 1x8192 window: no clock figures
        self.assertNotIn("sm_mhz", rows[("qkvo", "1x8192")]["tools"]["qtrain"])
        text = bct.render_text(rows, order, envs, durations)
        self.assertRegex(text, r"qtrain +17000 .* 1550  695 100%  ok")
        self.assertRegex(text, r"hf-autocast +7500 .* 1840  575  50%  ok")

    def test_main_writes_json_and_markdown(self):
        d = os.path.join(self.tmp, "run")
        self.make_run(d)
        out = os.path.join(self.tmp, "merged")
        rc = bct.main([d, "--out", out])
        self.assertEqual(rc, 0)
        rows = json.loads(read(out + ".json"))
        self.assertEqual([(r["targets"], r["case"]) for r in rows], [("qkvo", "8x512"), ("qkvo", "1x8192")])
        self.assertTrue(read(out + ".md").startswith("| targets |"))


FAKE_QTRAIN = r"""#!/usr/bin/env bash
# stand-in for `qtrain` (init-random and bench only)
cmd="$1"; shift
out=""; cases=""; targets=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift ;;
    --cases) cases="$2"; shift ;;
    --targets) targets="$2"; shift ;;
  esac
  shift
done
case "$cmd" in
  init-random) mkdir -p "$out"; echo '{"model_type": "mistral"}' > "$out/config.json"; echo "wrote $out" ;;
  bench)
    echo "loading" >&2
    for c in ${cases//,/ }; do
      sleep 0.3
      printf '{"case": "%s", "targets": "%s", "tokens_per_s": 12345.0, "step_s": 0.5, "peak_device_mem_used_mib": 8192.0, "losses": [10.5, 10.1], "loss_falls": true}\n' "$c" "$targets"
    done ;;
  *) exit 2 ;;
esac
"""

FAKE_SMI = r"""#!/usr/bin/env bash
# stand-in for nvidia-smi: the header query, or samples every 100 ms with -lms
case " $* " in
  *" -lms "*) while true; do echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), 4096"; sleep 0.1; done ;;
  *) echo "name, memory.total [MiB], driver_version, compute_cap"; echo "Fake GPU, 143771 MiB, 0, 9.0" ;;
esac
"""


@unittest.skipUnless(shutil.which("bash") and shutil.which("awk"), "needs bash and awk")
class BenchCompareScriptTest(unittest.TestCase):
    def test_failed_peers_are_recorded_and_qtrain_still_reported(self):
        if importlib.util.find_spec("torch") or importlib.util.find_spec("bitsandbytes"):
            self.skipTest("torch/bitsandbytes are importable here: this test wants the peers' import failure")
        tmp = tempfile.mkdtemp(prefix="bench-compare-")
        try:
            bindir = os.path.join(tmp, "bin")
            os.makedirs(bindir)
            for name, text in (("qtrain", FAKE_QTRAIN), ("nvidia-smi", FAKE_SMI)):
                path = os.path.join(bindir, name)
                with open(path, "w") as f:
                    f.write(text)
                os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
            out = os.path.join(tmp, "out")
            env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], ARCHIVE=os.path.join(tmp, "bc.tgz"))
            env.pop("PYTHONPATH", None)
            p = subprocess.run(
                [
                    "bash",
                    os.path.join(HERE, "bench-compare.sh"),
                    os.path.join(bindir, "qtrain"),
                    out,
                    "--cases",
                    "8x512,1x8192",
                    "--targets",
                    "qkvo",
                    "--model",
                    os.path.join(tmp, "model"),
                    "--peers",
                    "autocast,liger,unsloth",
                    "--warmup",
                    "1",
                    "--steps",
                    "3",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
            text = read(os.path.join(out, "compare.txt"))
            for peer in ("hf-autocast", "hf-liger", "unsloth"):
                self.assertRegex(text, peer + r" .*ERROR: (import|import unsloth): ModuleNotFoundError")
            self.assertRegex(text, r"qtrain +12345 ")
            self.assertIn("none ran", text)
            hf = [json.loads(x) for x in read(os.path.join(out, "peer-hf.jsonl")).splitlines()]
            self.assertEqual(sorted((r["recipe"], r["case"]) for r in hf), sorted((r, c) for r in ("autocast", "liger") for c in ("8x512", "1x8192")))
            phases = [line.split("\t")[0] for line in read(os.path.join(out, "durations.tsv")).splitlines()]
            self.assertEqual(phases, ["init-random", "qtrain-qkvo", "peer-hf(autocast,liger)", "peer-unsloth"])
            self.assertTrue(os.path.getsize(os.path.join(tmp, "bc.tgz")) > 0)
        finally:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    unittest.main()
