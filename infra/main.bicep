// func-sync in one environment: everything the function app runs on, wired identity-based.
//
//   az deployment group create -g rg-sync-<env> -f infra/main.bicep -p infra/parameters/<env>.bicepparam
//
// One user-assigned identity does everything the app does; each module grants it exactly the
// data-plane role its service needs, next to the resource (read each module's `roles` section
// to see who can do what). No connection string or key is handed to the app: the one secret
// the platform still needs (the content share of an Elastic Premium plan) is a Key Vault
// reference.

targetScope = 'resourceGroup'

@description('Environment name; resources are named <kind>-sync-<env> (func-sync-<env> for the app).')
@allowed([
  'dev'
  'staging'
  'prod'
])
param env string

param location string = resourceGroup().location

@description('Elastic Premium size. Custom handlers run on Linux Consumption, Elastic Premium or Dedicated plans, not on Flex Consumption; Elastic Premium keeps an instance warm for the timers and webhooks and scales on queue length.')
@allowed([
  'EP1'
  'EP2'
  'EP3'
])
param planSku string = 'EP1'

@description('Most instances the plan scales out to.')
param maximumInstances int = 20

@description('Cosmos DB serverless (pay per request, single region) instead of autoscale throughput.')
param cosmosServerless bool = true

@description('Who the alerts notify: [{ name: string, emailAddress: string }].')
param alertEmailReceivers array

@description('Days a sync history record is kept (seed plans: 7, 30, 90).')
@minValue(1)
@maxValue(24855)
param historyRetentionDays int = 30

@description('Per-tenant retention, tenant=days pairs: t1=7,t2=90; each from 1 to 24855 days, as historyRetentionDays.')
param historyRetentionDaysByTenant string = ''

@description('Refresh OAuth tokens that expire within this many milliseconds.')
@minValue(0)
param tokenRefreshThresholdMs int = 7200000

@description('Records per sync job before a continuation job takes over.')
@minValue(1)
param syncMaxRecords int = 1000

@description('Shortest time between two scheduled syncs of one integration.')
@minValue(0)
@maxValue(527040)
param syncMinIntervalMinutes int = 5

@description('Scheduled syncs of one tenant under way at once.')
@minValue(1)
param syncMaxConcurrentPerTenant int = 3

var tags = {
  application: 'func-sync'
  environment: env
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: 'id-func-sync-${env}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    env: env
    location: location
    tags: tags
    principalId: identity.outputs.principalId
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    env: env
    location: location
    tags: tags
    principalId: identity.outputs.principalId
    contentShareName: 'func-sync-${env}'
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  params: {
    env: env
    location: location
    tags: tags
    principalId: identity.outputs.principalId
  }
}

module cosmos 'modules/cosmos.bicep' = {
  name: 'cosmos'
  params: {
    env: env
    location: location
    tags: tags
    principalId: identity.outputs.principalId
    serverless: cosmosServerless
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    env: env
    location: location
    tags: tags
    principalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
  }
}

module eventGrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  params: {
    env: env
    location: location
    tags: tags
    principalId: identity.outputs.principalId
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    env: env
    location: location
    tags: tags
    planSku: planSku
    maximumInstances: maximumInstances
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    contentShareName: storage.outputs.contentShareName
    contentShareSecretUri: keyVault.outputs.contentShareSecretUri
    appInsightsConnectionString: monitoring.outputs.connectionString
    serviceBusHost: serviceBus.outputs.namespaceHost
    cosmosEndpoint: cosmos.outputs.endpoint
    cosmosDatabase: cosmos.outputs.database
    cosmosContainer: cosmos.outputs.container
    keyVaultUri: keyVault.outputs.uri
    eventGridEndpoint: eventGrid.outputs.endpoint
    historyRetentionDays: historyRetentionDays
    historyRetentionDaysByTenant: historyRetentionDaysByTenant
    tokenRefreshThresholdMs: tokenRefreshThresholdMs
    syncMaxRecords: syncMaxRecords
    syncMinIntervalMinutes: syncMinIntervalMinutes
    syncMaxConcurrentPerTenant: syncMaxConcurrentPerTenant
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  params: {
    env: env
    tags: tags
    emailReceivers: alertEmailReceivers
    appInsightsId: monitoring.outputs.id
    serviceBusNamespaceId: serviceBus.outputs.id
    location: location
  }
}

output functionAppName string = functionApp.outputs.name
output functionAppHostName string = functionApp.outputs.hostName
output webhookBaseUrl string = 'https://${functionApp.outputs.hostName}'
output serviceBusNamespaceHost string = serviceBus.outputs.namespaceHost
output cosmosEndpoint string = cosmos.outputs.endpoint
output keyVaultUri string = keyVault.outputs.uri
output eventGridEndpoint string = eventGrid.outputs.endpoint
output identityClientId string = identity.outputs.clientId
