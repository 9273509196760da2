// drizzle-kit's configuration for the demo application. DATABASE_URL names the database (the tests point it
// at the embedded server's socket); only the application's schema is the application's: the runbook's
// ledger (tenancy_runbook) and Drizzle's own bookkeeping (drizzle) are left out.
import { defineConfig } from "drizzle-kit";

export default defineConfig({
  dialect: "postgresql",
  schema: "./src/schema.ts",
  out: "./drizzle",
  dbCredentials: { url: process.env.DATABASE_URL ?? "postgresql://localhost/tenancy_demo" },
  schemaFilter: ["public"],
  migrations: { table: "__drizzle_migrations", schema: "drizzle" },
  strict: true,
  verbose: true,
});
