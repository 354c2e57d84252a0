// graphile-worker as a same-machine peer for `settle bench queue --peer graphile`.
//
//   node run.js bench --url postgres://…/settle_bench_queue_graphile [--jobs 100000]
//       [--workers 2] [--concurrency 24] [--pool 25] [--local-queue 500]
//       [--complete-delay 0] [--latency-jobs 1000]
//
// Recreates the database named in --url (it must start with settle_bench), installs graphile's
// schema, starts --workers worker processes (this file in `worker` mode) with the given options,
// then measures, as `settle bench queue` does for settle:
// - pickup: one job at a time into the idle workers; the job's locked_at - created_at (both
//   Postgres' clock), read by a trigger as graphile deletes the finished job;
// - drain: --jobs no-op jobs added by one add_jobs call (one transaction), then the time from
//   its commit until the jobs table is empty.
// The last line printed is one JSON object with the figures; the database is dropped at the end.
"use strict";

const { fork } = require("node:child_process");
const { Client } = require("pg");
const { run, runMigrations, Logger } = require("graphile-worker");

// Read from the installed package (its "exports" hide package.json from require).
const VERSION = JSON.parse(
  require("node:fs").readFileSync(`${__dirname}/node_modules/graphile-worker/package.json`, "utf8"),
).version;

function options(argv) {
  const o = {
    url: process.env.DATABASE_URL,
    jobs: 100000,
    workers: 2,
    concurrency: 24,
    pool: 25,
    localQueue: 500,
    completeDelay: 0,
    latencyJobs: 1000,
  };
  const names = {
    "--url": "url",
    "--jobs": "jobs",
    "--workers": "workers",
    "--concurrency": "concurrency",
    "--pool": "pool",
    "--local-queue": "localQueue",
    "--complete-delay": "completeDelay",
    "--latency-jobs": "latencyJobs",
  };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key) throw new Error(`unknown option ${argv[i]}`);
    o[key] = key === "url" ? argv[i + 1] : Number(argv[i + 1]);
  }
  if (!o.url) throw new Error("--url (or DATABASE_URL) is required");
  return o;
}

// Warnings and errors only: a drain must not be slowed by per-job log lines.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`graphile ${level}: ${message}`);
});

async function worker(o) {
  // The documented high-throughput configuration (graphile's performance page), sizes from flags.
  const runner = await run({
    preset: {
      worker: {
        connectionString: o.url,
        concurrentJobs: o.concurrency,
        maxPoolSize: o.pool,
        localQueue: { size: o.localQueue },
        completeJobBatchDelay: o.completeDelay,
        failJobBatchDelay: o.completeDelay,
      },
    },
    logger,
    taskList: { noop: async () => {} },
    noHandleSignals: true,
  });
  process.on("message", async (m) => {
    if (m === "stop") {
      await runner.stop();
      process.exit(0);
    }
  });
  process.send("ready");
  await runner.promise;
}

async function withClient(url, f) {
  const client = new Client({ connectionString: url });
  await client.connect();
  try {
    return await f(client);
  } finally {
    await client.end();
  }
}

async function recreateDatabase(url, drop_only) {
  const target = new URL(url);
  const name = decodeURIComponent(target.pathname.slice(1));
  if (!/^settle_bench\w*$/.test(name)) {
    throw new Error(`refusing to use ${name}: benchmark databases are named settle_bench*`);
  }
  const admin = new URL(url);
  admin.pathname = "/postgres";
  await withClient(admin.toString(), async (c) => {
    await c.query(`drop database if exists "${name}" with (force)`);
    if (!drop_only) await c.query(`create database "${name}"`);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function startWorkers(o) {
  const children = [];
  for (let i = 0; i < o.workers; i++) {
    const child = fork(__filename, ["worker", ...process.argv.slice(3)]);
    await new Promise((resolve, reject) => {
      child.once("message", resolve);
      child.once("exit", (code) => reject(new Error(`worker exited (${code}) before ready`)));
    });
    children.push(child);
  }
  return children;
}

async function stopWorkers(children) {
  await Promise.all(
    children.map(
      (child) =>
        new Promise((resolve) => {
          child.once("exit", resolve);
          child.send("stop");
        }),
    ),
  );
}

// Pickup latency: graphile deletes a finished job, so a trigger keeps each one's claim delay.
async function latency(c, n) {
  await c.query(`
    create table public.bench_pickup (ms float8 not null);
    create function public.bench_pickup() returns trigger language plpgsql as $$
    begin
      insert into public.bench_pickup
        values (extract(epoch from old.locked_at - old.created_at) * 1000);
      return old;
    end $$;
    create trigger bench_pickup before delete on graphile_worker._private_jobs
      for each row execute function public.bench_pickup();`);
  for (let i = 1; i <= n; i++) {
    await c.query("select graphile_worker.add_job('noop', '{}'::json)");
    for (;;) {
      const { rows } = await c.query("select count(*)::int as n from public.bench_pickup");
      if (rows[0].n >= i) break;
      await sleep(0.5);
    }
    await sleep(2);
  }
  const { rows } = await c.query(`
    select percentile_cont(0.5) within group (order by ms) as p50,
           percentile_cont(0.99) within group (order by ms) as p99
    from public.bench_pickup`);
  await c.query("drop trigger bench_pickup on graphile_worker._private_jobs");
  return rows[0];
}

async function drain(c, n) {
  const started = process.hrtime.bigint();
  await c.query(
    `select graphile_worker.add_jobs(array(
       select ('noop', '{}'::json, null, null, null, null, null, null)::graphile_worker.job_spec
       from generate_series(1, $1::int)))`,
    [n],
  );
  const committed = process.hrtime.bigint();
  for (;;) {
    const { rows } = await c.query(
      "select exists (select 1 from graphile_worker._private_jobs) as left",
    );
    if (!rows[0].left) break;
    await sleep(20);
  }
  const done = process.hrtime.bigint();
  const seconds = (a, b) => Number(b - a) / 1e9;
  return { enqueue_s: seconds(started, committed), drain_s: seconds(committed, done) };
}

async function bench(o) {
  await recreateDatabase(o.url, false);
  await runMigrations({ connectionString: o.url, logger });
  const children = await startWorkers(o);
  try {
    return await withClient(o.url, async (c) => {
      const pickup = await latency(c, o.latencyJobs);
      const { enqueue_s, drain_s } = await drain(c, o.jobs);
      return {
        version: VERSION,
        jobs: o.jobs,
        workers: o.workers,
        concurrency: o.concurrency,
        local_queue: o.localQueue,
        complete_delay_ms: o.completeDelay,
        enqueue_s,
        drain_s,
        drain_jobs_per_s: o.jobs / drain_s,
        pickup_p50_ms: pickup.p50,
        pickup_p99_ms: pickup.p99,
      };
    });
  } finally {
    await stopWorkers(children);
    await recreateDatabase(o.url, true);
  }
}

async function main() {
  const [mode, ...rest] = process.argv.slice(2);
  const o = options(rest);
  if (mode === "worker") return worker(o);
  if (mode === "bench") return console.log(JSON.stringify(await bench(o)));
  throw new Error("usage: node run.js bench|worker --url URL [options]");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
