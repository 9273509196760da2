// The application's own view of tenancy, through drizzle-orm: as APP_ROLE, a transaction that sets the
// tenant (TENANT_ID, when given) reads its workflows and inserts one, then a read without a tenant.
// Prints one line of JSON for the test that runs it (tests/test_drizzle_kit.py).
import { count, sql } from "drizzle-orm";
import { drizzle } from "drizzle-orm/node-postgres";
import pg from "pg";
import { randomUUID } from "node:crypto";
import * as schema from "./schema";

const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 1 });
pool.on("connect", (client) => client.query(`SET ROLE "${process.env.APP_ROLE}"`));
const db = drizzle(pool, { schema });
const tenant = process.env.TENANT_ID ? Number(process.env.TENANT_ID) : undefined;
const org = Number(process.env.ORG_ID);

const inside = await db.transaction(async (tx) => {
  if (tenant !== undefined) {
    // SET LOCAL, the form that also reaches Citus workers (there after SET LOCAL citus.propagate_set_commands =
    // 'local'); it takes no bound parameter, so the id is checked to be an integer before it goes in the statement
    if (!Number.isSafeInteger(tenant)) throw new Error(`not a tenant id: ${process.env.TENANT_ID}`);
    await tx.execute(sql.raw(`set local app.current_tenant_id = '${tenant}'`));
  }
  const rows = await tx.select({ tenantId: schema.workflows.tenantId }).from(schema.workflows);
  const values = { uuid: randomUUID(), name: `orm ${randomUUID()}`, orgId: org, definition: {} };
  const [inserted] = await tx.insert(schema.workflows)
    .values(tenant === undefined ? (values as typeof schema.workflows.$inferInsert) : { ...values, tenantId: tenant })
    .returning({ id: schema.workflows.id, tenantId: schema.workflows.tenantId });
  return { seen: rows.length, tenants: [...new Set(rows.map((r) => r.tenantId))].sort(), inserted };
});
const [outside] = await db.select({ n: count() }).from(schema.workflows);
console.log(JSON.stringify({ ...inside, outside: outside.n }));
await pool.end();
