// The version both programs report (agent `welcome`, `--version`); kept equal to package.json by a test.
export const VERSION = '0.1.0';
