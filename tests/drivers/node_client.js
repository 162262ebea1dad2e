// node-postgres (with pg-cursor) against one database: prints what each step returns, so
// that the output through pgshard can be compared with the output on one plain
// PostgreSQL (tests/drivers.rs). node-postgres sends unnamed statements (or named ones
// with `name`), text results, and pg-cursor reads a named portal in parts (Execute with
// a row limit, Flush between) outside or inside a transaction.

const path = require('path');
const { Client, Pool } = require(path.join(__dirname, 'node/node_modules/pg'));
const Cursor = require(path.join(__dirname, 'node/node_modules/pg-cursor'));

const url = process.argv[2];
const T = 'node_items'; // sharded by id in the pgshard configuration

function show(name, value) {
  console.log(`${name}: ${JSON.stringify(value)}`);
}

async function step(name, f) {
  try {
    show(name, await f());
  } catch (e) {
    console.log(`${name}: error ${e.code}`);
  }
}

function readAll(cursor, n) {
  return new Promise((resolve, reject) => cursor.read(n, (err, rows) => (err ? reject(err) : resolve(rows))));
}

async function main() {
  const c = new Client(url);
  await c.connect();
  await c.query(`DROP TABLE IF EXISTS ${T}`);
  await c.query(`CREATE TABLE ${T} (id bigint PRIMARY KEY, name text, qty int, seen timestamptz)`);
  await step('insert many', async () => (await c.query(
    `INSERT INTO ${T} (id, name, qty, seen) SELECT g, 'n' || g, g % 5, '2026-01-01'::timestamptz + g * interval '1 hour' FROM generate_series(1, 40) g`)).rowCount);
  for (let i = 41; i <= 50; i++) {
    await c.query(`INSERT INTO ${T} (id, name, qty) VALUES ($1, $2, $3)`, [i, `p${i}`, i % 5]);
  }
  await step('by key', async () => (await c.query(`SELECT id, name, qty FROM ${T} WHERE id = $1`, [7])).rows);
  await step('named statement', async () => (await c.query({ name: 'by_qty', text: `SELECT count(*) FROM ${T} WHERE qty = $1`, values: [2] })).rows);
  await step('named again', async () => (await c.query({ name: 'by_qty', text: `SELECT count(*) FROM ${T} WHERE qty = $1`, values: [3] })).rows);
  await step('merged', async () => (await c.query(`SELECT qty, count(*), min(name), max(seen) FROM ${T} GROUP BY qty ORDER BY qty`)).rows);
  await step('array rows', async () => (await c.query({ text: `SELECT id, name FROM ${T} WHERE id <= $1 ORDER BY id DESC`, values: [5], rowMode: 'array' })).rows);
  await step('multi statement', async () => (await c.query(`SELECT 1 AS a; SELECT count(*) FROM ${T}`)).map((r) => r.rows));

  // pg-cursor outside a transaction: a named portal read in parts.
  await step('cursor', async () => {
    const cur = c.query(new Cursor(`SELECT id FROM ${T} WHERE id > $1 ORDER BY id`, [30]));
    const parts = [await readAll(cur, 4), await readAll(cur, 4), await readAll(cur, 100), await readAll(cur, 5)];
    await new Promise((r) => cur.close(r));
    return parts.map((p) => p.map((r) => r.id));
  });
  // Inside a transaction: the shards join it, the reads see its writes.
  await step('transaction', async () => {
    await c.query('BEGIN');
    await c.query(`UPDATE ${T} SET qty = 99 WHERE id = $1`, [11]);
    await c.query(`UPDATE ${T} SET qty = 99 WHERE id = $1`, [12]);
    const merged = (await c.query(`SELECT id FROM ${T} WHERE qty = $1 ORDER BY id`, [99])).rows;
    const cur = c.query(new Cursor(`SELECT id, qty FROM ${T} ORDER BY qty DESC, id`));
    const first = await readAll(cur, 3);
    await new Promise((r) => cur.close(r));
    await c.query('ROLLBACK');
    return [merged, first];
  });
  await step('after rollback', async () => (await c.query(`SELECT count(*) FROM ${T} WHERE qty = 99`)).rows);
  await step('error', () => c.query(`SELECT id / 0 FROM ${T} WHERE id = $1`, [1]));
  await step('after error', async () => (await c.query('SELECT 1 AS one')).rows);
  await step('error in transaction', async () => {
    await c.query('BEGIN');
    try {
      await c.query(`SELECT id / 0 FROM ${T}`);
    } catch (e) {
      const again = await c.query('SELECT 1').then(() => 'ran', (e2) => e2.code);
      await c.query('ROLLBACK');
      return [e.code, again];
    }
    return 'no error';
  });

  // LISTEN/NOTIFY.
  await step('notification', async () => {
    const got = new Promise((resolve) => c.once('notification', (m) => resolve([m.channel, m.payload])));
    await c.query('LISTEN node_chan');
    const o = new Client(url);
    await o.connect();
    await o.query("NOTIFY node_chan, 'hi'");
    await o.end();
    return await got;
  });
  await c.query('UNLISTEN *');

  // A pool of clients, concurrently.
  const pool = new Pool({ connectionString: url, max: 4 });
  await step('pool', async () => (await Promise.all([...Array(24).keys()].map((i) => pool.query(`SELECT count(*) AS n FROM ${T} WHERE id <= $1`, [i])))).map((r) => r.rows[0].n));
  await pool.end();
  await c.query(`DROP TABLE ${T}`);
  await c.end();
  console.log('done');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
