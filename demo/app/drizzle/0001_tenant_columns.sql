ALTER TABLE "decision_tables" ADD COLUMN "tenant_id" bigint NOT NULL;--> statement-breakpoint
ALTER TABLE "endpoints" ADD COLUMN "tenant_id" bigint NOT NULL;--> statement-breakpoint
ALTER TABLE "knowledge_bases" ADD COLUMN "tenant_id" bigint NOT NULL;--> statement-breakpoint
ALTER TABLE "models" ADD COLUMN "tenant_id" bigint NOT NULL;--> statement-breakpoint
ALTER TABLE "rules" ADD COLUMN "tenant_id" bigint NOT NULL;--> statement-breakpoint
ALTER TABLE "templates" ADD COLUMN "tenant_id" bigint NOT NULL;--> statement-breakpoint
ALTER TABLE "widgets" ADD COLUMN "tenant_id" bigint NOT NULL;--> statement-breakpoint
ALTER TABLE "workflows" ADD COLUMN "tenant_id" bigint NOT NULL;--> statement-breakpoint
ALTER TABLE "decision_tables" ADD CONSTRAINT "decision_tables_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "endpoints" ADD CONSTRAINT "endpoints_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "knowledge_bases" ADD CONSTRAINT "knowledge_bases_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "models" ADD CONSTRAINT "models_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "rules" ADD CONSTRAINT "rules_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "templates" ADD CONSTRAINT "templates_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "widgets" ADD CONSTRAINT "widgets_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "workflows" ADD CONSTRAINT "workflows_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "decision_tables_tenant_id_idx" ON "decision_tables" USING btree ("tenant_id");--> statement-breakpoint
CREATE INDEX "endpoints_tenant_id_idx" ON "endpoints" USING btree ("tenant_id");--> statement-breakpoint
CREATE INDEX "knowledge_bases_tenant_id_idx" ON "knowledge_bases" USING btree ("tenant_id");--> statement-breakpoint
CREATE INDEX "models_tenant_id_idx" ON "models" USING btree ("tenant_id");--> statement-breakpoint
CREATE INDEX "rules_tenant_id_idx" ON "rules" USING btree ("tenant_id");--> statement-breakpoint
CREATE INDEX "templates_tenant_id_idx" ON "templates" USING btree ("tenant_id");--> statement-breakpoint
CREATE INDEX "widgets_tenant_id_idx" ON "widgets" USING btree ("tenant_id");--> statement-breakpoint
CREATE INDEX "workflows_tenant_id_idx" ON "workflows" USING btree ("tenant_id");